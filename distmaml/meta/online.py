"""Online bi-level optimisation: inner runs that persist across outer steps.

Episodic training starts every inner problem again at every outer step. Online, N runs keep their
state -- weights, the rule's state (momentum, Adam's moments), a step counter and a task key (its
mini-batch stream) -- from one outer step to the next:

    lookahead   phi's hypergradient through U inner steps from each run's state, by any method
    outer step  phi <- the outer optimizer's step on it
    advance     each run takes its U real steps with the updated phi (no graph), its counter += U;
                a run whose counter has reached the horizon H starts again from problem.start
                before the next lookahead

This is Meta-Weight-Net's order (Shu et al. 2019: a lookahead with the current phi, the update of
phi, the real step with the new phi). U = 1 with SGD is the one-step lookahead of Learning to
Reweight and Meta-Weight-Net; a larger U is truncated backpropagation along the run's own
trajectory. The runs' first counters are multiples of U spread evenly over the horizon
(`staggered_steps`), so that every meta-batch mixes early and late training.

Every method differentiates a persistent run unchanged, because the run reaches it as a problem
and a rule (`OnlineProblem`, `OnlineRule`): the problem's start is the run's stored weights (a
constant: a problem whose start reads phi, like MAML's, would lose that path, so it is refused), the
rule starts from the run's stored state (distmaml.meta.unrolling.starting_state), and both the inner
loss and the rule see the run's own global counter, start + k at the unroll's k-th step, as an int64
tensor. A problem takes part only if it says so (`modes` includes "online"): its inner loss must
accept that tensor step (counter-based mini-batches do).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.func import vmap
from torch.utils._pytree import tree_map

from distmaml.errors import SettingError
from distmaml.meta.functional import Params, Tasks, detached
from distmaml.meta.rules import Rule
from distmaml.meta.unrolling import State, start_weights, unroll

EPISODIC, ONLINE = "episodic", "online"


def modes(problem: Any) -> tuple[str, ...]:
    """The schedules a problem supports: its `modes`, or episodic only."""
    return tuple(getattr(problem, "modes", (EPISODIC,)))


def run_group(method: Any) -> int:
    """Runs that belong together (PES's antithetic pairs: 2): one process, one mini-batch stream, one
    counter, started again together. 1 for every method that reads runs one by one."""
    return int(getattr(method, "run_group", 1))


def check_mode(problem: Any, inner: Any, online: bool, horizon: int, burn_in: bool = True, runs: int = 0) -> None:
    """Refuse, in one line, a problem, rule or method (inner's) that cannot run as the schedule asks."""
    rule = inner.rule
    if not online:
        getattr(inner.method, "check_episodic", lambda: None)()
    name = type(problem).__name__
    wanted = ONLINE if online else EPISODIC
    if wanted not in modes(problem):
        if online:
            raise SettingError("online.runs", "> 0", f"{name} does not run online (its modes: "
                               f"{', '.join(modes(problem))}): online, a run's start is its stored weights, so a "
                               "problem whose start reads phi (MAML) would lose that path; a problem runs online "
                               "when its inner loss takes the run's step as a tensor and it says so (modes = "
                               "('episodic', 'online'))")
        raise SettingError("online.runs", 0, f"{name} runs online only (online.runs >= 1, online.unroll, "
                           "online.horizon): it has no episode to start again")
    if not online:
        return
    if rule.per_step:
        raise SettingError("inner.rule", rule.name, "holds one learned entry per inner step of an episode; online, "
                           "runs sit at different counters along a horizon: use schedule (blocks over "
                           "online.horizon), meta_sgd or a fixed rule")
    if getattr(rule, "blocks", 1) > 1 and not horizon:
        raise SettingError("online.horizon", 0, f"the {rule.name} rule's blocks divide a horizon; online.horizon = 0 "
                           "(runs never start again) has none")
    if not burn_in and getattr(rule, "counts_updates", False):
        raise SettingError("online.burn_in", False, f"a run that starts fresh at a staggered counter has the "
                           f"{rule.name} rule's state at its start, and the rule takes the counter for the count of "
                           "its own updates (Adam's bias correction): burn the runs in (online.burn_in=true)")
    group = run_group(inner.method)
    if runs % group:
        raise SettingError("online.runs", runs, f"{inner.method.name} takes the runs in groups of {group} (antithetic "
                           "pairs: each particle's mirror image): an odd number of particles has one without its pair")
    getattr(inner.method, "check_online", lambda: None)()


def staggered_steps(indices: torch.Tensor, runs: int, unroll_steps: int, horizon: int, group: int = 1) -> torch.Tensor:
    """The first counters of global runs `indices` out of `runs`: multiples of U spread evenly over
    [0, H) (run r: floor(r * (H / U) / N) * U), all 0 without a horizon; runs in one `group` (r // group)
    share their group's counter, spread over the N / group groups."""
    if not horizon:
        return torch.zeros_like(indices)
    return ((indices // group) * (horizon // unroll_steps) // (runs // group)) * unroll_steps


@dataclass(frozen=True)
class OnlineRule:
    """A rule as a persistent run sees it: its state carries the run's counter at the unroll's start,
    and its step k is taken at counter start + k. Everything else is the rule's own."""

    rule: Rule

    def __getattr__(self, name: str) -> Any:
        if name == "rule":  # not yet set (a copy being made): no recursion through __getattr__
            raise AttributeError(name)
        return getattr(self.rule, name)

    def init(self, weights: Params) -> State:
        first = next(iter(weights.values()))
        return {"rule": self.rule.init(weights), "start": torch.zeros((), dtype=torch.int64, device=first.device)}

    def step(self, weights: Params, grads: Params, state: State, learned: Params, step) -> tuple[Params, State]:
        new, rule_state = self.rule.step(weights, grads, state["rule"], learned, state["start"] + step)
        return new, {"rule": rule_state, "start": state["start"]}


@dataclass(frozen=True, eq=False)
class OnlineProblem:
    """A problem whose tasks are persistent runs: task = {"task": the problem's own task (the run's
    key), "weights": the run's weights, "state": its rule state, "step": its counter}, each with the
    run dimension first in a batch. The outer loss and metrics are the problem's at the run's task."""

    problem: Any
    unroll: int = 0  # U: the outer loss of a problem with `outer_loss_at` is taken at the run's step start + U

    def __getattr__(self, name: str) -> Any:
        if name in ("problem", "unroll"):
            raise AttributeError(name)
        return getattr(self.problem, name)

    def meta_parameters(self) -> Params:
        return self.problem.meta_parameters()

    def inner_template(self) -> Params:
        return self.problem.inner_template()

    def start(self, phi: Params, task: Any) -> Params:
        return task["weights"]

    def start_state(self, phi: Params, task: Any) -> State:
        return {"rule": task["state"], "start": task["step"]}

    def inner_loss(self, weights: Params, phi: Params, task: Any, step) -> torch.Tensor:
        return self.problem.inner_loss(weights, phi, task["task"], task["step"] + step)

    def outer_loss(self, weights: Params, phi: Params, task: Any) -> torch.Tensor:
        at = getattr(self.problem, "outer_loss_at", None)  # one that depends on where the run is (its next batch)
        if at is not None:
            return at(weights, phi, task["task"], task["step"] + self.unroll)
        return self.problem.outer_loss(weights, phi, task["task"])

    def metrics(self, weights: Params, phi: Params, task: Any) -> dict[str, torch.Tensor]:
        return self.problem.metrics(weights, phi, task["task"])

    def to(self, device) -> "OnlineProblem":
        return OnlineProblem(self.problem.to(device), self.unroll)


class Runs(NamedTuple):
    """Persistent runs, run dimension first: each run's task (its key), weights, rule state, counter
    (inner steps taken since its start) and what a persistent method keeps per run (`carry`: PES's
    accumulated perturbation; None for every other method)."""

    tasks: Tasks
    weights: Params
    state: State
    step: torch.Tensor
    carry: Any = None

    def as_tasks(self) -> dict[str, Any]:
        """The runs as OnlineProblem's tasks (weights, state and carry as constants)."""
        tasks = {"task": self.tasks, "weights": detached(self.weights),
                 "state": tree_map(torch.Tensor.detach, self.state), "step": self.step}
        return tasks if self.carry is None else {**tasks, "carry": tree_map(torch.Tensor.detach, self.carry)}


def fresh_runs(problem: Any, rule: Rule, phi: Params, tasks: Tasks, steps: torch.Tensor) -> Runs:
    """Runs at their start: problem.start(phi, task), the rule's initial state, counters `steps`."""
    if not steps.numel():  # no run here (more processes than runs): empty weights of the right shapes
        weights = {name: value.new_empty((0, *value.shape)).to(steps.device)
                   for name, value in problem.inner_template().items()}
        return Runs(tasks, weights, rule.init(weights), steps)
    with torch.no_grad():
        weights = start_weights(problem, detached(phi), tasks)
    state = rule.init(weights)  # zeros shaped like the batched weights: the same as one init per run
    return Runs(tasks, weights, state, steps)


def advance(problem: OnlineProblem, inner: Any, phi: Params, runs: Runs, steps: int,
            moving: torch.Tensor | None = None) -> Runs:
    """Every run `steps` real inner steps further at phi, without a graph (inner.rule must be an
    OnlineRule); with `moving` ([n] bool), only those runs move."""
    if not runs.step.numel():  # no run here
        return runs
    with torch.no_grad():
        result = unroll(problem, detached(phi), runs.as_tasks(), inner, steps=steps, differentiated=0)
    moved = Runs(runs.tasks, result.weights, result.state["rule"], runs.step + steps, runs.carry)
    return moved if moving is None else choose(moving, moved, runs)


def choose(mask: torch.Tensor, where_true: Runs, where_false: Runs) -> Runs:
    """Run by run, `where_true`'s state where `mask`, else `where_false`'s."""

    def pick(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return torch.where(mask.reshape(-1, *([1] * (a.dim() - 1))), a, b)

    return Runs(*(None if a is None else tree_map(pick, a, b) for a, b in zip(where_true, where_false)))


def burn_in(problem: OnlineProblem, inner: Any, phi: Params, runs: Runs, targets: torch.Tensor, unroll_steps: int,
            ) -> Runs:
    """Train every run from counter 0 to its target (a multiple of U) at phi, U steps at a time, all
    runs together (a run that has reached its target stays)."""
    while bool((runs.step < targets).any()):
        runs = advance(problem, inner, phi, runs, unroll_steps, moving=runs.step < targets)
    return runs


def carried_on(runs: Runs, carried: dict, steps: int) -> Runs:
    """The runs after a persistent method's own unrolls of `steps` steps (MetaGradient.carried)."""
    return Runs(runs.tasks, carried["weights"], carried["state"]["rule"], runs.step + steps, carried["carry"])


def grouped(mask: torch.Tensor, group: int) -> torch.Tensor:
    """[n] bool: true for every run of a group (consecutive `group` runs) in which `mask` holds for any."""
    return mask if group == 1 else mask.reshape(-1, group).any(1).repeat_interleave(group)


def place(keep: torch.Tensor, part: Runs, whole: Runs) -> Runs:
    """`whole` with the runs where `keep` holds replaced, in order, by `part`'s (select's inverse)."""
    index = torch.nonzero(keep).flatten()
    return Runs(*(None if a is None else tree_map(lambda into, leaf: into.index_copy(0, index, leaf), a, b)
                  for a, b in zip(whole, part)))


def select(runs: Runs, keep: torch.Tensor) -> Runs:
    """The runs where `keep` ([n] bool) holds, in order."""
    index = torch.nonzero(keep).flatten()
    return Runs(*(None if part is None else tree_map(lambda leaf: leaf.index_select(0, index), part) for part in runs))


def per_run(fn, runs: Runs, phi: Params):
    """fn(weights_i, phi, task_i) of every run, as OnlineProblem's functions take it ([0] without runs)."""
    if not runs.step.numel():
        first = next(iter(runs.weights.values()))
        return first.new_zeros(0)
    return vmap(fn, in_dims=(0, None, 0))(detached(runs.weights), phi, runs.as_tasks())


def with_rule(inner: Any, steps: int) -> Any:
    """inner as a persistent run takes it: its rule an OnlineRule, `steps` (U) steps per outer step."""
    rule = inner.rule if isinstance(inner.rule, OnlineRule) else OnlineRule(inner.rule)
    return dataclasses.replace(inner, rule=rule, steps=steps)
