"""Every baseline at its own best: the one rule by which the learned-hyperparameter and learned-data
results' baselines are trained, and the search that applies it.

    python -m benchmarks.baselines digits_hyperclean --seeds 0 1 2
    python -m benchmarks.baselines mnist1d_lr --seeds 0 1 2
    python -m benchmarks.baselines all --seeds 0 1 2          # every case, one file each

The rule. A baseline is a network of the learned run's architecture trained by plain SGD on its own
data, with its own settings found by a search on the validation split:

- the rate, from a log grid (0.01 to 10, two per decade); the weight decay (SGD's, on every
  weight), from {0, 1e-4, 1e-3, 1e-2, 1e-1}; and the number of steps, by early stopping: the
  validation split is checked every `budget / 20` steps up to a budget of max(4 T, 1,000) steps, T
  the learned run's inner steps. A schedule (step decay: the rate for 80 % of its length, then a
  fifth of it; cosine: from the rate down to 0) is searched over its peak rate and its length (a
  quarter, half or all of the budget) at the decay the case's constant rate chose, and is scored at
  its end only.
- the setting with the best validation accuracy, averaged over `inits` random initialisations,
  wins (ties: the lower validation loss; a case whose validation split is too small for accuracy to
  rank settings is chosen by validation loss instead, and says so). Its test accuracy is that of
  the same initialisations at the chosen step. A case may widen a grid where its first search chose
  an edge; the result records every grid searched.
- a baseline that trains on the validation split itself (validation only; oracle + validation)
  chooses its settings by 3-fold cross-validation inside that split (each fold trains on the rest of
  the split, plus the oracle's examples where it has them, and is scored on the fold), then trains
  on all of it with the chosen settings.
- a chosen setting at the edge of its range is reported as such, not as tuned: a rate at either end
  of its grid, a decay at the top of its grid, a stop at the first check. Two bounds are natural and
  reported as what they are: a decay of 0, and the whole budget (early stopping never triggered).
- the search's cost is part of the result: the inner steps it trained (candidates x steps, folds and
  the final training included) and its CPU-seconds on one thread, candidates trained together.

The networks are the config's model (an MLP: linear layers and elementwise activations), run here on
stacked weights with plain autograd: this file shares no code with the engine beyond the model's
definition and the data. Initialisations are PyTorch's defaults, drawn from the seed; mini-batches
are drawn with replacement, the same for every candidate of a seed.

Writes benchmarks/results/baselines_<case>.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import REPO, RESULTS, machine, write

RATES = tuple(10.0 ** (e / 2) for e in range(-4, 3))  # 0.01 ... 10, two per decade
DECAYS = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
SCHEDULES = ("constant", "step", "cosine")
FOLDS = 3
CHECKS = 20  # validation checks per budget


class SearchError(ValueError):
    """A search that cannot run: an empty grid, a budget of no steps."""


@dataclass(frozen=True)
class Space:
    """What a search tries: rates x decays x schedules, each trained for up to `budget` steps."""

    rates: tuple[float, ...] = RATES
    decays: tuple[float, ...] = DECAYS
    budget: int = 1000
    schedule: str = "constant"  # constant: early stopping at every check; step, cosine: scored at their end
    checks: int = CHECKS
    only_length: int = 0  # a schedule tried at this length alone (0: a quarter, half and all of the budget)

    def __post_init__(self) -> None:
        for name in ("rates", "decays"):
            values = getattr(self, name)
            if not values:
                raise SearchError(f"baseline search: {name} is empty; give at least one value")
            if any(not math.isfinite(v) or v < 0 or (name == "rates" and v == 0) for v in values):
                raise SearchError(f"baseline search: {name} = {list(values)}: every value must be finite and "
                                  f"{'> 0' if name == 'rates' else '>= 0'}")
            if list(values) != sorted(set(values)):
                raise SearchError(f"baseline search: {name} = {list(values)} must be increasing, without repeats")
        if not (isinstance(self.budget, int) and self.budget > 0):
            raise SearchError(f"baseline search: budget = {self.budget!r} steps; give a whole number > 0")
        if not (isinstance(self.checks, int) and 0 < self.checks <= self.budget):
            raise SearchError(f"baseline search: checks = {self.checks!r}; give a whole number from 1 to the budget "
                              f"({self.budget})")
        if self.schedule not in SCHEDULES:
            raise SearchError(f"baseline search: schedule = {self.schedule!r}; choose one of {', '.join(SCHEDULES)}")

    @property
    def check_steps(self) -> list[int]:
        return [round(self.budget * (i + 1) / self.checks) for i in range(self.checks)]

    @property
    def lengths(self) -> list[int]:
        """The lengths a schedule is tried at; constant rates are early-stopped instead."""
        if self.schedule == "constant":
            return [self.budget]
        return [self.only_length] if self.only_length else sorted({self.budget // 4, self.budget // 2, self.budget} - {0})

    def settings(self) -> list[dict[str, Any]]:
        return [{"rate": r, "decay": d, "length": n} for n, r, d in itertools.product(self.lengths, self.rates,
                                                                                       self.decays)]


def rate_at(schedule: str, rate: torch.Tensor, length: torch.Tensor, step: int) -> torch.Tensor:
    """Each candidate's rate at `step` (0-based); 0 once its schedule has ended."""
    if schedule == "constant":
        return rate
    if schedule == "step":
        shape = torch.where(step < 0.8 * length, 1.0, 0.2)
    else:  # cosine
        shape = 0.5 * (1 + torch.cos(math.pi * step / length))
    return torch.where(step < length, rate * shape, torch.zeros_like(rate))


class StackedMLP:
    """The config's MLP on stacked weights: every linear layer's weight [C, out, in] and bias [C, out]
    for C candidates, applied as one batched matmul; activations elementwise."""

    ELEMENTWISE: dict[type, Callable[[torch.Tensor], torch.Tensor]] = {
        nn.ReLU: F.relu, nn.ELU: F.elu, nn.SiLU: F.silu, nn.Tanh: torch.tanh, nn.Sigmoid: torch.sigmoid}

    def __init__(self, model: nn.Module):
        self.plan: list[Any] = []  # an activation, or the index of a linear layer's (weight, bias)
        linear = 0
        for module in model.modules():
            if isinstance(module, nn.Linear):
                self.plan.append(linear)
                linear += 1
            elif type(module) in self.ELEMENTWISE:
                self.plan.append(self.ELEMENTWISE[type(module)])
            elif not isinstance(module, nn.Flatten) and not list(module.children()):  # inputs come flattened
                raise SearchError(f"baselines: the model holds a {type(module).__name__}; this search trains MLPs "
                                  "(linear layers and elementwise activations) only")
        self.layers = linear

    @staticmethod
    def weights(models: list[nn.Module]) -> list[torch.Tensor]:
        """[weight0, bias0, weight1, ...] stacked over `models` (one per candidate)."""
        per_model = [[t.detach() for m in model.modules() if isinstance(m, nn.Linear)
                      for t in (m.weight, m.bias)] for model in models]
        return [torch.stack(column).clone() for column in zip(*per_model)]

    def __call__(self, weights: list[torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Logits [C, n, classes] of flattened inputs x [n, features], shared by every candidate."""
        h = x
        for step in self.plan:
            if callable(step):
                h = step(h)
                continue
            weight, bias = weights[2 * step], weights[2 * step + 1]
            if h.dim() == 2:  # the shared inputs: one matmul broadcast over the candidates
                h = torch.matmul(h, weight.transpose(1, 2)) + bias.unsqueeze(1)
            else:
                h = torch.baddbmm(bias.unsqueeze(1), h, weight.transpose(1, 2))
        return h


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(x.shape[0], -1)


def losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Each candidate's mean loss: cross-entropy over class logits [C, n, classes], or the logistic
    loss of one logit per example [C, n, 1] against labels in {0, 1}."""
    if logits.shape[-1] == 1:
        return F.binary_cross_entropy_with_logits(logits.squeeze(-1), y.to(logits.dtype).expand(logits.shape[0], -1),
                                                  reduction="none").mean(-1)
    return F.cross_entropy(logits.transpose(1, 2), y.expand(logits.shape[0], -1), reduction="none").mean(-1)


def _scores(net: StackedMLP, weights, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per candidate: accuracy and mean loss on (x, y); NaN where a candidate is not finite."""
    with torch.no_grad():
        logits = net(weights, x)
        predicted = (logits.squeeze(-1) > 0).long() if logits.shape[-1] == 1 else logits.argmax(-1)
        accuracy = (predicted == y).to(logits.dtype).mean(-1)
        loss = losses(logits, y)
        bad = ~torch.isfinite(loss)
        return accuracy.masked_fill(bad, math.nan), loss.masked_fill(bad, math.nan)


def train_candidates(inits: list[nn.Module], data: tuple[torch.Tensor, torch.Tensor],
                     scored: dict[str, tuple[torch.Tensor, torch.Tensor]], space: Space, batch_size: int,
                     seed: int) -> dict[str, Any]:
    """Every setting of `space` from every initialisation, trained together on `data`; at each of the
    space's checks, each candidate's accuracy and loss on each split of `scored`.

    Returns {"<split>_accuracy": [checks, settings, inits], "<split>_loss": ..., "steps": candidate
    steps trained}. A candidate whose loss stops being finite is frozen and scored NaN from then on."""
    settings = space.settings()
    rate, decay, length = (torch.tensor([s[key] for s in settings]) for key in ("rate", "decay", "length"))
    return train_schedules(inits, data, scored, lambda step: rate_at(space.schedule, rate, length, step),
                           decay, space.budget, space.check_steps, batch_size, seed)


def train_schedules(inits: list[nn.Module], data: tuple[torch.Tensor, torch.Tensor],
                    scored: dict[str, tuple[torch.Tensor, torch.Tensor]], rates: Callable[[int], torch.Tensor],
                    decay: torch.Tensor, steps: int, checks: list[int], batch_size: int, seed: int) -> dict[str, Any]:
    """S schedules from every initialisation (networks of one architecture, left as they are), trained
    together by SGD: `rates(step)` gives the S rates of 0-based step `step`, `decay` the S weight
    decays. At each step of `checks`, each candidate's accuracy and loss on each split of `scored`,
    as [checks, S, inits]."""
    net = StackedMLP(inits[0])
    count, settings = decay.numel() * len(inits), decay.numel()
    weights = [w.repeat(settings, *[1] * (w.dim() - 1)) for w in StackedMLP.weights(inits)]
    dtype = weights[0].dtype

    def for_each_init(values: torch.Tensor) -> torch.Tensor:  # candidate index = setting * len(inits) + init
        return values.to(dtype).repeat_interleave(len(inits))

    decay = for_each_init(decay)
    alive = torch.ones(count, dtype=torch.bool)
    x, y = _flat(data[0]), data[1]
    scored = {name: (_flat(sx), sy) for name, (sx, sy) in scored.items()}
    generator = torch.Generator().manual_seed(seed)
    curves: dict[str, list[torch.Tensor]] = {f"{name}_{what}": [] for name in scored for what in ("accuracy", "loss")}
    checks, trained = set(checks), 0
    for step in range(steps):
        if batch_size and batch_size < x.shape[0]:
            index = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
            bx, by = x[index], y[index]
        else:
            bx, by = x, y
        for w in weights:
            w.requires_grad_(True)
        logits = net(weights, bx)
        per_candidate = losses(logits, by)
        grads = torch.autograd.grad(per_candidate.sum(), weights)
        lr = for_each_init(rates(step)) * alive
        trained += int((lr > 0).sum())  # lr is 0 for a frozen candidate
        with torch.no_grad():
            alive &= torch.isfinite(per_candidate.detach()) & (per_candidate.detach() < 1e6)
            new = []
            for w, g in zip(weights, grads):
                shape = (-1,) + (1,) * (w.dim() - 1)
                w = w.detach() - (lr * alive).view(shape) * (g + decay.view(shape) * w.detach())
                new.append(torch.where(alive.view(shape), w, torch.zeros_like(w)))
            weights = new
        if step + 1 in checks:
            for name, (sx, sy) in scored.items():
                accuracy, loss = _scores(net, weights, sx, sy)
                accuracy[~alive], loss[~alive] = math.nan, math.nan
                curves[f"{name}_accuracy"].append(accuracy.view(settings, len(inits)))
                curves[f"{name}_loss"].append(loss.view(settings, len(inits)))
    out: dict[str, Any] = {key: torch.stack(value) for key, value in curves.items()}
    out["steps"] = trained
    return out


def choose(space: Space, accuracy: torch.Tensor, loss: torch.Tensor, by: str = "accuracy") -> tuple[int, int]:
    """(check, setting) with the best mean validation accuracy over initialisations (and folds, summed
    before), ties going to the lower validation loss; or, `by` "loss", the lowest mean validation
    loss. A schedule counts only at its own end."""
    settings = space.settings()
    accuracy, loss = accuracy.double().mean(-1), loss.double().mean(-1)
    score, tiebreak = (accuracy, loss) if by == "accuracy" else (-loss, -accuracy)
    if space.schedule != "constant":  # a schedule's checks before its end are not candidates
        ends = torch.tensor([[step == s["length"] for s in settings] for step in space.check_steps])
        score = score.masked_fill(~ends, -math.inf)
    score = torch.nan_to_num(score, nan=-math.inf)
    tiebreak = torch.nan_to_num(tiebreak, nan=math.inf)
    best = score.max()
    if best == -math.inf:
        raise SearchError("baseline search: every candidate diverged")
    candidates = (score == best).nonzero().tolist()
    check, setting = min(candidates, key=lambda cs: (tiebreak[cs[0], cs[1]].item(), cs[1], cs[0]))
    return check, setting


def edges(space: Space, setting: dict[str, Any], steps: int) -> tuple[list[str], list[str]]:
    """(edges, natural bounds) the chosen setting sits at."""
    edge, natural = [], []
    if len(space.rates) > 1 and setting["rate"] in (space.rates[0], space.rates[-1]):
        edge.append(f"rate {setting['rate']:g} at the {'low' if setting['rate'] == space.rates[0] else 'high'} end "
                    "of its grid")
    if setting["decay"] == 0 and space.decays[0] == 0:
        natural.append("decay 0")
    elif len(space.decays) > 1 and setting["decay"] == space.decays[-1]:
        edge.append(f"decay {setting['decay']:g} at the high end of its grid")
    if steps == space.budget:
        natural.append("the whole budget: early stopping never triggered" if space.schedule == "constant"
                       else "the longest schedule")
    elif space.schedule == "constant" and steps == space.check_steps[0]:
        edge.append(f"stopped at the first check ({steps} steps)")
    elif space.schedule != "constant" and steps == space.lengths[0] and len(space.lengths) > 1:
        edge.append(f"the shortest schedule ({steps} steps)")
    return edge, natural


@dataclass
class Split:
    """A baseline's data: what it trains on, and (for k-fold selection) the part that folds come from."""

    train: tuple[torch.Tensor, torch.Tensor]
    folded: tuple[torch.Tensor, torch.Tensor] | None = None  # cross-validated inside; `train` always kept


def _fold(n: int, folds: int, seed: int) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(10_007 + seed))
    return [order[i::folds] for i in range(folds)]


def search(inits: list[nn.Module], split: Split,
           validation: tuple[torch.Tensor, torch.Tensor], test: tuple[torch.Tensor, torch.Tensor], space: Space,
           batch_size: int, seed: int, folds: int = FOLDS, by: str = "accuracy") -> dict[str, Any]:
    """The baseline rule applied once: the chosen setting (by validation accuracy, or `by` "loss" the
    validation loss), its validation and test accuracy, where it sits in its range, and what the
    search cost. Every training starts from `inits`, which it leaves as they are."""
    if by not in ("accuracy", "loss"):
        raise SearchError(f"baseline search: by = {by!r}; choose accuracy or loss")
    started, steps = time.process_time(), 0
    settings = space.settings()
    if split.folded is None:
        found = train_candidates(inits, split.train, {"validation": validation, "test": test}, space,
                                 batch_size, seed)
        steps += found["steps"]
        check, index = choose(space, found["validation_accuracy"], found["validation_loss"], by)
        chosen_steps = space.check_steps[check]
        validation_accuracy = found["validation_accuracy"][check, index].double().mean().item()
        test_accuracy = found["test_accuracy"][check, index]
    else:
        fx, fy = split.folded
        accuracy, loss = 0, 0
        for held in _fold(fx.shape[0], folds, seed):
            keep = torch.ones(fx.shape[0], dtype=torch.bool)
            keep[held] = False
            train = (torch.cat([split.train[0], fx[keep]]), torch.cat([split.train[1], fy[keep]]))
            found = train_candidates(inits, train, {"fold": (fx[held], fy[held])}, space, batch_size, seed)
            steps += found["steps"]
            accuracy, loss = accuracy + found["fold_accuracy"], loss + found["fold_loss"]
        check, index = choose(space, accuracy / folds, loss / folds, by)
        chosen_steps = space.check_steps[check]
        validation_accuracy = (accuracy / folds)[check, index].double().mean().item()
        setting = settings[index]
        final = Space(rates=(setting["rate"],), decays=(setting["decay"],), schedule=space.schedule, checks=1,
                      budget=chosen_steps if space.schedule == "constant" else setting["length"],
                      only_length=setting["length"] if space.schedule != "constant" else 0)
        everything = (torch.cat([split.train[0], fx]), torch.cat([split.train[1], fy]))
        found = train_candidates(inits, everything, {"test": test}, final, batch_size, seed)
        steps += found["steps"]
        test_accuracy = found["test_accuracy"][-1, 0]
    setting = settings[index]
    if space.schedule != "constant":
        chosen_steps = setting["length"]
    edge, natural = edges(space, setting, chosen_steps)
    tests = test_accuracy.double()
    return {"rate": setting["rate"], "decay": setting["decay"], "schedule": space.schedule, "steps": chosen_steps,
            "validation_accuracy": validation_accuracy, "selected_by": f"validation {by} "
            + (f"by {folds}-fold cross-validation inside the split it trains on" if split.folded is not None
               else "on the validation split"),
            "test_accuracy": tests.mean().item(), "test_accuracy_per_init": tests.tolist(),
            "edges": edge, "natural_bounds": natural,
            "search": {"settings": len(settings), "inits": len(inits), "folds": folds if split.folded is not None
                       else 0, "inner_steps": steps, "cpu_seconds": time.process_time() - started}}



@dataclass(frozen=True)
class Baseline:
    """One baseline of a case: its name, the data it trains on, and what its search tries."""

    name: str
    data: str = "train"  # train | oracle | random_real | validation | oracle+validation
    schedule: str = "constant"
    decays: tuple[float, ...] | None = None  # None: the case's grid
    activation: str = ""  # the network's activation, in place of the learned run's (the activation baselines)
    decay_from: str = ""  # a schedule searched at the decay another baseline of the case chose


DATA = ("train", "oracle", "random_real", "validation", "oracle+validation")


@dataclass(frozen=True)
class Case:
    """The baselines of learned results that share one data set, network and training budget."""

    config: str
    baselines: tuple[Baseline, ...]
    overrides: tuple[str, ...] = ()
    inits: int = 2
    rates: tuple[float, ...] = RATES
    decays: tuple[float, ...] = DECAYS
    steps_factor: int = 4  # the budget: this many times the learned run's inner steps, and at least 1,000
    by: str = "accuracy"  # what chooses a setting: validation accuracy (ties: loss), or validation loss

    def budget(self, inner_steps: int) -> int:
        return max(self.steps_factor * inner_steps, 1000) if self.steps_factor > 0 else 0


HYPERCLEAN = (Baseline("noisy"), Baseline("validation only", "validation"), Baseline("oracle", "oracle"),
              Baseline("oracle + validation", "oracle+validation"))
DISTILL = (Baseline("random real examples", "random_real"), Baseline("full training set"))
DECAY = (Baseline("no decay", decays=(0.0,)), Baseline("one tuned decay"))
CASES = {
    "mnist1d_lr": Case("configs/mnist1d_lr.yaml", (
        Baseline("fixed rate"), Baseline("step decay", schedule="step", decay_from="fixed rate"),
        Baseline("cosine", schedule="cosine", decay_from="fixed rate"))),
    "mnist1d_activation": Case("configs/mnist1d_activation.yaml", tuple(
        Baseline(name, activation=name) for name in ("relu", "elu", "swish"))),
    # full-batch steps on 3,500 sequences: the costliest search, so one initialisation and four rates,
    # 0.316 to 10 (full batches take larger rates than the other cases' mini-batches)
    "mnist1d_weight_decay": Case("configs/mnist1d_weight_decay.yaml", DECAY, inits=1, rates=RATES[3:]),
    # a convex problem on full batches: rates up to 100. Its 100 validation examples give accuracies in
    # steps of 1 %, equal for most settings, and a large rate's noisy curve an accuracy above the rest
    # now and then; their loss (the learned decays' own outer loss) ranks the settings instead.
    "logistic": Case("configs/logistic_weight_decay.yaml", DECAY, rates=tuple(10.0 ** (e / 2) for e in range(-4, 5)),
                     by="loss"),
    "digits_hyperclean": Case("configs/digits_hyperclean.yaml", HYPERCLEAN),
    "digits_hyperclean_val10": Case("configs/digits_hyperclean.yaml", HYPERCLEAN, ("task.args.validation=0.0556",)),
    "mnist1d_hyperclean": Case("configs/mnist1d_hyperclean.yaml", HYPERCLEAN),
    "digits_distill": Case("configs/digits_distill.yaml", DISTILL),
    "digits_distill_m10": Case("configs/digits_distill.yaml", DISTILL, ("distill.per_class=10",)),
    # ten random real sequences want strong regularisation: rates from 1e-3, decays up to 1
    "mnist1d_distill": Case("configs/mnist1d_distill.yaml", DISTILL, rates=tuple(10.0 ** (e / 2) for e in range(-6, 3)),
                            decays=DECAYS + (1.0,)),
}


def _config(case: Case, extra: tuple[str, ...] = ()):
    from distmaml.config import load_config

    return load_config(REPO / case.config, ["logging.progress=false", *case.overrides, *extra])


def _split(baseline: Baseline, problem, seed: int) -> Split:
    data = problem.data
    train = (data.train_x.float(), data.train_y)
    if baseline.data in ("oracle", "oracle+validation"):
        flipped = getattr(problem, "flipped", None)
        if flipped is None:
            raise SearchError(f"baseline {baseline.name!r}: the problem does not know which labels are flipped")
        train = (train[0][~flipped], train[1][~flipped])
    if baseline.data == "random_real":
        generator = torch.Generator().manual_seed(20_011 + seed)
        picked = [members[torch.randperm(len(members), generator=generator)[:problem.per_class]]
                  for members in (train[1] == label for label in range(int(train[1].max()) + 1))
                  for members in [members.nonzero().flatten()]]
        index = torch.cat(picked)
        train = (train[0][index], train[1][index])
    validation = (data.val_x.float(), data.val_y)
    if baseline.data == "validation":
        return Split((train[0][:0], train[1][:0]), validation)
    if baseline.data == "oracle+validation":
        return Split(train, validation)
    return Split(train)


def run_baseline(case: Case, config, learner, baseline: Baseline, seed: int,
                 chosen: dict[str, dict]) -> dict[str, Any]:
    """`baseline` of `case` (whose config built `learner`: its data and network) searched and trained
    for one seed (`chosen`: the seed's earlier baselines)."""
    from distmaml.models import build_model

    if baseline.data not in DATA:
        raise SearchError(f"baseline {baseline.name!r}: data = {baseline.data!r}; choose one of {', '.join(DATA)}")
    problem, family = learner.problem, learner.family
    if baseline.activation:  # the learned run's network with another activation
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, activation=baseline.activation))

    inits = []
    for index in range(case.inits):
        torch.manual_seed(1_000 * seed + index)
        inits.append(build_model(config, family.input_shape, family.num_outputs).float())

    decays = case.decays if baseline.decays is None else baseline.decays
    if baseline.decay_from:
        decays = (chosen[baseline.decay_from]["decay"],)
    space = Space(rates=case.rates, decays=decays, budget=case.budget(config.inner.steps), schedule=baseline.schedule)
    data, split = problem.data, _split(baseline, problem, seed)
    found = search(inits, split, (data.val_x.float(), data.val_y), (data.test_x.float(), data.test_y),
                   space, config.training_run.batch_size, seed, by=case.by)
    if baseline.decay_from:  # its decay's search is part of its cost
        for key in ("inner_steps", "cpu_seconds"):
            found["search"][key] += chosen[baseline.decay_from]["search"][key]
    found["data"] = baseline.data
    found["training_examples"] = int(split.train[0].shape[0]) + (0 if split.folded is None
                                                                  else int(split.folded[0].shape[0]))
    found["space"] = {"rates": list(space.rates), "decays": list(space.decays), "budget": space.budget,
                      "checks": space.check_steps, "lengths": space.lengths}
    return found


def run_case(name: str, seeds: list[int], case: Case | None = None) -> dict[str, Any]:
    """Every baseline of the case `name` (or of `case`, a changed copy of it) for each seed."""
    from distmaml.build import build

    case = case or CASES[name]
    config = _config(case)
    learner = build(config, "cpu")  # the data and the network, shared by every baseline and seed
    started, rows = time.time(), []
    for seed in seeds:
        chosen: dict[str, dict] = {}
        for baseline in case.baselines:
            chosen[baseline.name] = run_baseline(case, config, learner, baseline, seed, chosen)
            found = chosen[baseline.name]
            print(f"{name} seed {seed} {baseline.name}: test {100 * found['test_accuracy']:.1f} % (validation "
                  f"{100 * found['validation_accuracy']:.1f} %) at rate {found['rate']:g}, decay {found['decay']:g}, "
                  f"{found['steps']} steps{'; EDGE: ' + ', '.join(found['edges']) if found['edges'] else ''}; "
                  f"{found['search']['cpu_seconds']:.0f} CPU-s", flush=True)
        rows.append({"seed": seed, "baselines": chosen})
    summary = {}
    for baseline in case.baselines:
        accuracies = [row["baselines"][baseline.name]["test_accuracy"] for row in rows]
        summary[baseline.name] = {"mean": statistics.mean(accuracies),
                                  "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0}
    return {"benchmark": "baselines", "case": name, "config": case.config, "overrides": list(case.overrides),
            "learned_inner_steps": config.inner.steps, "budget": case.budget(config.inner.steps), "inits": case.inits,
            "folds": FOLDS,
            "machine": machine(torch.device("cpu")), "wall_seconds": time.time() - started, "rows": rows,
            "summary": summary}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("case", choices=[*CASES, "all"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for baselines_<case>.json")
    parser.add_argument("--rates", type=float, nargs="*", help="the rate grid (default: each case's)")
    parser.add_argument("--decays", type=float, nargs="*", help="the decay grid (default: each case's)")
    parser.add_argument("--steps-factor", type=int, help="the budget: this many times the learned run's inner "
                        "steps, and at least 1,000 (default 4)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    changes = {key: tuple(value) if isinstance(value, list) else value for key, value in
               (("rates", args.rates), ("decays", args.decays), ("steps_factor", args.steps_factor))
               if value is not None}
    custom = bool(changes)
    results = []
    for name in (CASES if args.case == "all" else [args.case]):
        try:
            result = run_case(name, args.seeds, dataclasses.replace(CASES[name], **changes))
        except SearchError as err:
            raise SystemExit(f"benchmarks.baselines {name}: {err}") from None
        result["command"] = " ".join(["python -m benchmarks.baselines", name, "--seeds", *map(str, args.seeds),
                                      *(argv_changes(changes) if custom else [])])
        print(f"wrote {write(result, args.out / f'baselines_{name}.json')}")
        results.append(result)
    return results


def argv_changes(changes: dict[str, Any]) -> list[str]:
    out = []
    for key, value in changes.items():
        out += [f"--{key.replace('_', '-')}", *map(str, value if isinstance(value, tuple) else (value,))]
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
