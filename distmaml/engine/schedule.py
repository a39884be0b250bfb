"""Where each outer step's tasks come from: drawn afresh (episodic), or persistent runs (online).

    schedule = make_schedule(learner, config, ctx, indices)
    problem, tasks, result = schedule.lookahead(iteration, inner, compute)   # compute(problem, tasks, inner, noise)
    ... all-reduce, outer step ...
    schedule.advance(phi)                                                    # online: the runs' real steps

Both are sharded by global index (a task's, a run's), so 1 and N processes compute the same thing.
Online (distmaml.meta.online holds the math) this process keeps its runs' state; a run whose
lookahead is not finite is left out of that step's hypergradient and starts again, counted
(`excluded`); `state_dict` gathers every process's runs for the checkpoint, and `load_state_dict`
takes this process's share back, for any number of processes.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from distmaml.engine import dist
from distmaml.meta import FirstOrder, Inner, MetaGradient, detached, num_tasks
from distmaml.meta.functional import Noise
from distmaml.meta.online import (OnlineProblem, Runs, advance, burn_in, carried_on, choose, fresh_runs, grouped,
                                  per_run, place, run_group, select, staggered_steps, with_rule)
from distmaml.rng import STREAM_NOISE, STREAM_ONLINE, STREAM_TRAIN, hash_u32, seed_words

log = logging.getLogger("distmaml.train")


def noise(seed: int, iteration, indices: torch.Tensor) -> Noise:
    """Where a stochastic method's perturbations come from at `iteration` (an int or a device tensor):
    a key of (seed, iteration), and the tasks' (runs') global indices."""
    return Noise(hash_u32(*seed_words(seed), STREAM_NOISE, iteration, device=indices.device), indices)


class Episodic:
    """Every outer step's tasks drawn afresh from (seed, iteration, global index)."""

    def __init__(self, learner, config, indices: torch.Tensor):
        self.problem, self.family, self.indices = learner.problem, learner.family, indices
        self.seed = config.train.seed

    def lookahead(self, iteration, inner, compute: Callable) -> tuple[Any, Any, MetaGradient]:
        batch = self.family.sample(STREAM_TRAIN, iteration, self.indices)
        return self.problem, batch, compute(self.problem, batch, inner, noise(self.seed, iteration, self.indices))

    def advance(self, phi) -> None:
        pass

    def excluded(self, device: torch.device) -> torch.Tensor:
        return torch.zeros((), device=device)

    def nothing_counted(self, excluded: torch.Tensor) -> bool:
        return False  # no task is ever left out (and no host sync is spent asking)

    def state_dict(self, ctx: dist.Context) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass

    def summary(self, ctx: dist.Context) -> dict | None:
        return None


class Online:
    """This process's share of the persistent runs (global indices `indices` of online.runs)."""

    def __init__(self, learner, config, indices: torch.Tensor, total: int | None = None):
        online = config.online
        self.family, self.theta = learner.family, learner.theta
        self.problem = OnlineProblem(learner.problem, online.unroll)
        self.rule = learner.inner.rule
        self.unroll, self.horizon = online.unroll, online.horizon
        self.total = online.runs if total is None else total
        self.burn = online.burn_in
        self.seed = config.train.seed
        # A persistent method (PES) carries the runs on with its own unrolls and keeps a state per run;
        # runs of one group (its antithetic pairs) share a mini-batch stream and a counter.
        method = learner.inner.method
        # (A problem with nothing to learn takes no lookahead: its runs move by their own steps.)
        self.persistent = bool(getattr(method, "persistent", False)) and bool(learner.theta)
        self.carry_init = getattr(method, "carry_init", None) if self.persistent else None
        self.group = run_group(method)
        self.carried: MetaGradient | None = None
        self.indices = indices
        self.device = indices.device
        count = len(indices)
        self.lives = torch.zeros(count, dtype=torch.int64, device=self.device)  # starts after the first, per run
        self.failures = torch.zeros(count, dtype=torch.int64, device=self.device)  # of them, for a non-finite state
        self.bad = torch.zeros(count, dtype=torch.bool, device=self.device)  # left out of this step: start again
        self.runs: Runs | None = None

    # -- the runs' tasks: a run's key is a function of (seed, life, global run index) --------------
    def _tasks(self) -> Any:
        if not len(self.indices):  # more processes than runs: this one only joins the collectives
            return self.family.sample(STREAM_ONLINE, 0, self.indices)
        parts, order = [], []
        for life in torch.unique(self.lives).tolist():
            where = torch.nonzero(self.lives == life).flatten()
            parts.append(self.family.sample(STREAM_ONLINE, int(life), self.indices[where] // self.group))
            order.append(where)
        position = torch.argsort(torch.cat(order))
        return tree_map(lambda *leaves: torch.cat(leaves).index_select(0, position), *parts)

    def _fresh(self, steps: torch.Tensor) -> Runs:
        runs = fresh_runs(self.problem.problem, self.rule, self.theta, self._tasks(), steps)
        return runs if self.carry_init is None else runs._replace(carry=self.carry_init(self.theta, len(steps)))

    def start(self) -> None:
        """Runs at their staggered counters, burned in there at the initial phi (online.burn_in) or fresh.
        A persistent method's runs start their carry (PES: the accumulated perturbation) after the burn-in."""
        targets = staggered_steps(self.indices, self.total, self.unroll, self.horizon, self.group)
        inner = with_rule(_plain(self), self.unroll)
        if self.burn:
            self.runs = burn_in(self.problem, inner, self.theta, self._fresh(torch.zeros_like(targets)), targets,
                                self.unroll)
        else:
            self.runs = self._fresh(targets)

    def lookahead(self, iteration, inner, compute: Callable) -> tuple[Any, Any, MetaGradient]:
        if self.runs is None:
            self.start()
        # A run that reached the horizon starts again here, not when it got there: until then (the end
        # of training, a checkpoint) it is the finished network.
        self._restart(grouped(self.runs.step >= self.horizon, self.group) if self.horizon else torch.zeros_like(self.bad))
        inner = with_rule(inner, self.unroll)
        runs = self.runs
        if not self.theta:  # nothing to learn (Learning to Reweight): the runs' outer losses, for the logs
            losses = per_run(self.problem.outer_loss, runs, {})
            self.bad = ~torch.isfinite(losses)
            kept = select(runs, ~self.bad)
            return self.problem, kept.as_tasks(), MetaGradient({}, losses[~self.bad], {}, detached(kept.weights))
        drawn = noise(self.seed, iteration, self.indices)
        result = compute(self.problem, runs.as_tasks(), inner, drawn)
        # A group (PES's pair) with any member not finite is left out whole.
        self.bad = grouped(~torch.isfinite(result.task_losses), self.group)
        if bool(self.bad.any()):  # left out of this step's hypergradient: computed again without them
            runs = select(runs, ~self.bad)
            result = (compute(self.problem, runs.as_tasks(), inner, Noise(drawn.key, drawn.index[~self.bad]))
                      if num_tasks(runs.step) else
                      MetaGradient({name: torch.zeros_like(value) for name, value in self.theta.items()},
                                   result.task_losses[:0], {name: value[:0] for name, value in result.stats.items()}))
        self.carried = result.carried
        return self.problem, runs.as_tasks(), result

    def excluded(self, device: torch.device) -> torch.Tensor:
        return self.bad.sum().to(device=device, dtype=torch.float64)

    def nothing_counted(self, excluded: torch.Tensor) -> bool:
        """Whether every run (of every process: `excluded` is the all-reduced count) was left out."""
        return bool(excluded >= self.total)

    def advance(self, phi) -> None:
        """Each run's U real steps at the updated phi -- or, for a persistent method, the steps its own
        unrolls took -- ; a run left out of the lookahead starts again."""
        if self.persistent:
            if bool((~self.bad).any()):
                kept = select(self.runs, ~self.bad)
                self.runs = place(~self.bad, carried_on(kept, self.carried, self.unroll), self.runs)
        else:
            inner = with_rule(_plain(self), self.unroll)
            self.runs = advance(self.problem, inner, phi, self.runs, self.unroll, moving=~self.bad)
        self.carried = None
        self.failures += self.bad.long()
        self._restart(self.bad)

    def _restart(self, which: torch.Tensor) -> None:
        """The runs `which` ([n] bool) from fresh weights, counter 0 and a new key; the runs of a group
        (a pair) restarted together take one life, and so one key."""
        if bool(which.any()):
            self.lives += which.long()
            if self.group > 1:
                shared = self.lives.reshape(-1, self.group).max(1).values.repeat_interleave(self.group)
                self.lives = torch.where(which, shared, self.lives)
            self.runs = choose(which, self._fresh(torch.zeros_like(self.runs.step)), self.runs)

    # -- checkpoint: every run's state, gathered by global index ------------------------------------
    def state_dict(self, ctx: dist.Context) -> dict:
        if self.runs is None:  # saved before any outer step (train.iterations = 0): the runs as they start
            self.start()
        parts = {"weights": self.runs.weights, "state": self.runs.state, "step": self.runs.step, "lives": self.lives,
                 "failures": self.failures, **({"carry": self.runs.carry} if self.runs.carry is not None else {})}
        leaves, spec = tree_flatten(parts)
        full = []
        for leaf in leaves:
            whole = leaf.new_zeros((self.total, *leaf.shape[1:]))
            whole[self.indices] = leaf
            full.append(whole)
        # One all-reduce per dtype: the flat buffer of all_reduce_sum holds one.
        for dtype in sorted({leaf.dtype for leaf in full}, key=str):  # the same order on every rank
            chosen = [i for i, leaf in enumerate(full) if leaf.dtype == dtype]
            for i, summed in zip(chosen, dist.all_reduce_sum([full[i] for i in chosen], ctx)):
                full[i] = summed
        return tree_unflatten([leaf.cpu() for leaf in full], spec)

    def load_state_dict(self, state: dict | None) -> None:
        if state is None:
            return
        mine = tree_map(lambda leaf: leaf.to(self.device).index_select(0, self.indices), state)
        self.lives, self.failures = mine["lives"], mine["failures"]
        carry = mine.get("carry") if self.persistent else None
        if self.persistent and carry is None:  # runs another method trained: their accumulated perturbation starts at 0
            carry = self.carry_init(self.theta, len(self.indices))
        self.runs = Runs(self._tasks(), mine["weights"], mine["state"], mine["step"], carry)
        if self.group > 1:  # runs another method trained, grouped now: a group whose members differ starts again
            self._restart(self._differ(self.runs.step) | self._differ(self.lives))

    def _differ(self, values: torch.Tensor) -> torch.Tensor:
        """[n] bool: true for every run of a group whose members' values are not all the same."""
        by_group = values.reshape(-1, self.group)
        return (by_group != by_group[:, :1]).any(1).repeat_interleave(self.group)

    def summary(self, ctx: dist.Context) -> dict:
        """The runs themselves: each one's metrics (the trained networks' own accuracy), counter and resets."""
        state = self.state_dict(ctx)
        phi = {name: value.detach() for name, value in self.theta.items()}
        with torch.no_grad():
            if len(self.indices):
                metrics = torch.func.vmap(self.problem.problem.metrics, in_dims=(0, None, 0))(
                    self.runs.weights, phi, self.runs.tasks)
                sums = [value.sum().reshape(1).double() for value in metrics.values()]
            else:  # no run here: zeros under the names a run's metrics have, for the all-reduce
                metrics = _metric_names(self, phi)
                sums = [torch.zeros(1, dtype=torch.float64, device=self.device) for _ in metrics]
        sums = dist.all_reduce_sum(sums, ctx)
        return {"runs": self.total, "steps": state["step"].tolist(), "restarts": int(state["lives"].sum()),
                "restarts_not_finite": int(state["failures"].sum()),
                "metrics": {name: float(value) / self.total for name, value in zip(metrics, sums)}}


def _metric_names(online: Online, phi) -> list[str]:
    """The names of a run's metrics, from one fresh run of the data on the `meta` device (shapes only)."""
    problem = online.problem.problem.to("meta")
    task = online.family.to("meta").sample(STREAM_ONLINE, 0, torch.zeros(1, dtype=torch.int64, device="meta"))
    weights = {name: torch.empty_like(value, device="meta") for name, value in problem.inner_template().items()}
    one = {name: value[0] for name, value in task.items()} if isinstance(task, dict) else task
    return list(problem.metrics(weights, {name: torch.empty_like(value, device="meta") for name, value in phi.items()},
                                one))


def _plain(online: Online) -> Inner:
    """The inner loop a run's real steps take: the rule's own, no graph (the method is not asked)."""
    return Inner(online.rule, online.unroll, FirstOrder())


def shard(config, ctx: dist.Context, method) -> range:
    """This process's global task (run) indices; a method's group of runs (PES's antithetic pairs) stays
    on one process."""
    return dist.shard(config.train.meta_batch, ctx.rank, ctx.world_size, run_group(method) if config.online.runs else 1)


def make_schedule(learner, config, indices: torch.Tensor):
    """The schedule config.online names: persistent runs (online.runs >= 1) or episodic tasks."""
    return Online(learner, config, indices) if config.online.runs else Episodic(learner, config, indices)


def as_runs(learner, tasks: Any, inner: Inner) -> tuple[Any, Any, Inner]:
    """(problem, tasks, inner) of the lookahead over `tasks` taken as runs (shapes only will do: the
    memory estimate's), whose stored weights and rule state count among the tasks' bytes."""
    count = num_tasks(tasks)
    template = learner.problem.inner_template()
    device = next(iter(tree_flatten(tasks)[0])).device
    weights = {name: torch.empty((count, *value.shape), dtype=value.dtype, device=device)
               for name, value in template.items()}
    carry_init = getattr(inner.method, "carry_init", None)  # a persistent method's per-run state (PES)
    carry = (None if carry_init is None else
             carry_init({name: torch.empty_like(value, device=device) for name, value in learner.theta.items()}, count))
    runs = Runs(tasks, weights, learner.inner.rule.init(weights), torch.zeros(count, dtype=torch.int64, device=device),
                carry)
    return OnlineProblem(learner.problem, inner.steps), runs.as_tasks(), with_rule(inner, inner.steps)


def first_lookahead(learner, config, count: int) -> tuple[Any, Any, Inner]:
    """(problem, tasks, inner) of the first outer step of `count` online runs, at their staggered (and
    burned-in) counters: what `distmaml gradcheck` checks the methods on, from the runs' stored state."""
    online = Online(learner, config, torch.arange(count, device=next(learner.model.parameters()).device), count)
    if count % online.group:  # runs a grouped method could not pair (gradcheck skips that method): not grouped
        online.group = 1
    online.start()
    return online.problem, online.runs.as_tasks(), with_rule(learner.inner, online.unroll)
