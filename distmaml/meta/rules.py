"""Inner update rules: how one inner step turns a task's weights and inner gradients into new weights.

A rule is a pair of pure functions in the style of optax / TorchOpt's functional optimizers:

    state = rule.init(weights)                                        # before the first step
    weights, state = rule.step(weights, grads, state, learned, step)  # one inner step

with `learned` the rule's meta-learned parameters (step sizes), which live in the same dict as the
model's weights (names under LEARNED, see `learned_names`), so the outer optimizer, the gradient
all-reduce, checkpoints, the replica check and the CUDA graph carry them like any weight.
`rule.parameters(weights)` gives their initial values. Everything is a differentiable tensor
function, vmapped over tasks by the unroll (distmaml.meta.unrolling), so the meta-gradient
flows through every rule in every mode. `step` is the inner step's index: a Python int in an
episode, or (online, distmaml.meta.online) each run's own global counter, an int64 tensor (one per
run under vmap): a rule that reads it (schedule, adam) takes either.

    sgd        w - lr g                                            (MAML)
    meta_sgd   w - alpha (.) g, alpha learned per weight element   (Li et al. 2017, Meta-SGD)
    lslr       w - alpha[step] g, alpha learned per tensor and step (Antoniou et al. 2019, MAML++)
    schedule   w - exp(s[block(step)]) g, a learned log step size per block of steps, for every weight
               (a learning-rate schedule: Maclaurin et al. 2015)
    momentum   b = mu b + g;  w - lr b                             (heavy ball, PyTorch's SGD momentum)
    adam       Adam's update with bias correction                   (Kingma and Ba 2015)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import torch

from distmaml.errors import SettingError
from distmaml.meta.functional import Params

# Names of learned rule parameters in the meta-parameter dict: "inner.lr.<weight name>". No model
# parameter name can clash: a module attribute cannot be called "inner.lr".
LEARNED = "inner.lr."
State = dict[str, Params]


def learned_names(theta: Params) -> list[str]:
    """The names in a meta-parameter dict that belong to the inner rule, not the model."""
    return [name for name in theta if name.startswith(LEARNED)]


class Rule(Protocol):
    name: str
    lr: float
    # True when each learned parameter has one entry per inner step (dimension 0): the adaptation
    # routine then hands step k its own entry, as `learned[name]` of shape [...] without that dimension.
    per_step: bool
    # True when the rule has meta-learned parameters (step sizes) in phi.
    learns: bool
    # True when a step is w - (step sizes) * (the gradient, or a sum with constants): its Jacobian in
    # the gradient is a fixed diagonal, which the finite-difference method relies on.
    linear_in_gradient: bool
    # True when `step` is the count of the rule's own updates (Adam's bias correction), not a position
    # along the steps: a persistent run must have taken them (distmaml.meta.online's burn-in).
    counts_updates: bool

    def curvature_limit(self) -> float | None:
        """The largest inner-loss curvature its steps are stable at, where one is known (SGD: 2 / lr)."""

    def parameters(self, weights: Params) -> Params: ...

    def describe(self, learned: Params) -> dict:
        """The learned parameters in the units a report states (a learning rate, not its log)."""

    def init(self, weights: Params) -> State: ...

    def step(self, weights: Params, grads: Params, state: State, learned: Params,
             step: int) -> tuple[Params, State]: ...

    # Optional, for rules whose learned parameters belong to the inner steps they were trained for:
    # beyond(learned, steps) -> str | None says in one sentence what adapting for `steps` steps uses
    # past those (evaluation warns with it); None within them. A rule without it has nothing to say.


def _past(trained: int, steps: int) -> str:
    """The inner steps after the first `trained`, counted from 1 as reports count them, with their verb:
    "steps 11–25 use", "step 11 uses"."""
    return f"step {steps} uses" if steps == trained + 1 else f"steps {trained + 1}–{steps} use"


class BaseRule:
    """What a rule has unless it says otherwise, as optax's `stateless` gives a transformation its
    empty state: no state between steps, no learned parameters, nothing to report, no known curvature
    limit, a step linear in the gradient. A rule subclasses it and overrides only what it has.

    `setting_keys` names the config key of each setting (a dataclass field), which its one-line errors
    name and against which tests/meta/test_methods_settings.py holds the config schema."""

    name = "base"
    per_step = False
    learns = False
    linear_in_gradient = True
    counts_updates = False
    setting_keys: dict[str, str] = {"lr": "inner.lr"}

    def curvature_limit(self) -> float | None:
        return None

    def parameters(self, weights: Params) -> Params:
        return {}

    def describe(self, learned: Params) -> dict:
        return {}

    def init(self, weights: Params) -> State:
        return {}


@dataclass(frozen=True)
class SGD(BaseRule):
    """Plain gradient descent at a fixed step size: MAML's inner loop."""

    lr: float = 0.01
    name = "sgd"

    def curvature_limit(self) -> float | None:
        return 2.0 / self.lr

    def step(self, weights, grads, state, learned, step):
        return {name: value - self.lr * grads[name] for name, value in weights.items()}, state


@dataclass(frozen=True)
class MetaSGD(BaseRule):
    """A learned step size for every weight element, starting at `lr` (Meta-SGD)."""

    lr: float = 0.01
    name = "meta_sgd"
    learns = True

    def parameters(self, weights: Params) -> Params:
        return {LEARNED + name: torch.full_like(value, self.lr) for name, value in weights.items()}

    def describe(self, learned: Params) -> dict:
        return {"step_size_mean": {name[len(LEARNED):]: value.mean().item() for name, value in learned.items()
                                   if name.startswith(LEARNED)}}

    def step(self, weights, grads, state, learned, step):
        return {name: value - learned[LEARNED + name] * grads[name] for name, value in weights.items()}, state


@dataclass(frozen=True)
class LSLR(BaseRule):
    """A learned step size per weight tensor and per inner step, starting at `lr` (MAML++'s LSLR).

    Adaptation with more steps than `steps` (at test time) keeps using the last step's sizes.
    """

    lr: float = 0.01
    steps: int = 1
    name = "lslr"
    per_step = True  # learned[name] arrives as this step's size, a scalar
    learns = True
    setting_keys = {"lr": "inner.lr", "steps": "inner.steps"}

    def parameters(self, weights: Params) -> Params:
        return {LEARNED + name: torch.full((max(self.steps, 1),), self.lr, dtype=value.dtype, device=value.device)
                for name, value in weights.items()}

    def describe(self, learned: Params) -> dict:
        return {"step_sizes": {name[len(LEARNED):]: value.tolist() for name, value in learned.items()
                               if name.startswith(LEARNED)}}

    def step(self, weights, grads, state, learned, step):
        return {name: value - learned[LEARNED + name] * grads[name] for name, value in weights.items()}, state

    def beyond(self, learned: Params, steps: int) -> str | None:
        """What steps past `self.steps` use: the unroll hands each the last entry (meta.unrolling.step_views)."""
        if steps <= self.steps:
            return None
        if not self.steps:
            return f"{_past(0, steps)} step sizes that no inner step trained (the run took 0 inner steps)"
        last = [value[-1].item() for name, value in learned.items() if name.startswith(LEARNED)]
        return (f"{_past(self.steps, steps)} the step sizes learned for step {self.steps}, the last one "
                f"trained (one per weight tensor, {min(last):.3g} to {max(last):.3g})")


@dataclass(frozen=True)
class Schedule(BaseRule):
    """A learned learning-rate schedule: one log step size for each of `blocks` equal blocks of the
    `steps` inner steps, shared by every weight; each starts at log(lr). The log keeps every rate
    positive and makes the hypergradient scale-free. Adapting for longer than `steps` (at test
    time) keeps the last block's rate."""

    lr: float = 0.01
    steps: int = 1
    blocks: int = 1
    name = "schedule"
    learns = True
    setting_keys = {"lr": "inner.lr", "steps": "inner.steps", "blocks": "inner.schedule_blocks"}

    def __post_init__(self) -> None:
        if not (isinstance(self.blocks, int) and self.blocks >= 1):
            raise SettingError("inner.schedule_blocks", self.blocks, "must be an integer >= 1")
        if self.steps < 1:
            raise SettingError("inner.steps", self.steps, "the schedule rule learns the rate of inner steps: there "
                               "must be at least one")
        if self.blocks > self.steps:
            raise SettingError("inner.schedule_blocks", self.blocks, f"must be at most inner.steps ({self.steps}): a "
                               f"block is at least one step")

    def parameters(self, weights: Params) -> Params:
        first = next(iter(weights.values()))
        return {LEARNED + "log_schedule": torch.full((self.blocks,), math.log(self.lr), dtype=first.dtype,
                                                     device=first.device)}

    def describe(self, learned: Params) -> dict:
        rates = learned[LEARNED + "log_schedule"].detach().exp().tolist()
        return {"learning_rate": rates[0] if len(rates) == 1 else rates}

    def block(self, step: int | torch.Tensor) -> int | torch.Tensor:
        if torch.is_tensor(step):  # a run's own counter (online): past the horizon, the last block
            return torch.clamp(step * self.blocks // max(self.steps, 1), max=self.blocks - 1)
        return min(step * self.blocks // max(self.steps, 1), self.blocks - 1)

    def step(self, weights, grads, state, learned, step):
        size = learned[LEARNED + "log_schedule"][self.block(step)].exp()
        return {name: value - size * grads[name] for name, value in weights.items()}, state

    def beyond(self, learned: Params, steps: int) -> str | None:
        """What steps past `self.steps` use: `block` clamps them to the last block."""
        if steps <= self.steps:
            return None
        if not self.steps:
            return f"{_past(0, steps)} rates that no inner step trained (the run took 0 inner steps)"
        rates = learned[LEARNED + "log_schedule"].detach().exp().tolist()
        if self.blocks == 1:
            return (f"{_past(self.steps, steps)} the schedule's one learned rate, {rates[0]:.3g}, learned for "
                    f"steps 1–{self.steps}")
        # The last block's first step: the least s (counted from 0) with s * blocks // steps >= blocks - 1.
        start = -(-(self.blocks - 1) * self.steps // self.blocks) + 1
        learned_for = (f"step {self.steps}" if start == self.steps else f"steps {start}–{self.steps}"
                       if start < self.steps else f"no step ({self.blocks} blocks for {self.steps} inner steps)")
        return (f"{_past(self.steps, steps)} the schedule's last learned rate (block {self.blocks} of {self.blocks}), "
                f"{rates[-1]:.3g}, learned for {learned_for}")


@dataclass(frozen=True)
class Momentum(BaseRule):
    """Heavy-ball momentum, b = momentum * b + g, w - lr * b; b starts at zero (so b = g at the first
    step, as torch.optim.SGD and higher's DifferentiableSGD do). The coefficient has no default: a
    momentum rule without one is a mistake, on the command line and in the library alike."""

    lr: float = 0.01
    momentum: float | None = None
    name = "momentum"
    setting_keys = {"lr": "inner.lr", "momentum": "inner.momentum"}

    def __post_init__(self) -> None:
        if self.momentum is None:
            raise SettingError("inner.momentum", None, "the momentum rule needs a coefficient in [0, 1), e.g. 0.9")
        if not 0 <= self.momentum < 1:
            raise SettingError("inner.momentum", self.momentum, "must be in [0, 1)")

    def init(self, weights: Params) -> State:
        return {"velocity": {name: torch.zeros_like(value) for name, value in weights.items()}}

    def step(self, weights, grads, state, learned, step):
        velocity = {name: self.momentum * state["velocity"][name] + grads[name] for name in weights}
        return {name: value - self.lr * velocity[name] for name, value in weights.items()}, {"velocity": velocity}


@dataclass(frozen=True)
class Adam(BaseRule):
    """Adam's step with bias correction, differentiable through every operation.

    epsilon sits outside the square root, as in torch.optim.Adam and higher's DifferentiableAdam:
    w - lr * m_hat / (sqrt(v_hat) + eps). Where v = 0 exactly (a weight whose inner gradients were all
    exactly zero: a dead ReLU unit, an unused class), the square root's derivative 1 / (2 sqrt(v)) is
    infinite and the chain rule's 0 * inf would make the whole meta-gradient NaN. The root is
    therefore taken of v + tiny (the smallest normal number of the dtype): its derivative there is
    large but finite, and multiplies dv/dg = 2 (1 - beta2) g = 0, giving 0 -- the limit the chain
    rule has (higher masks the same gradient to 0 with a hook). The forward value moves by at most
    sqrt(tiny) / eps relative (1e-11 in float32), below the dtype's resolution.
    """

    lr: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    name = "adam"
    linear_in_gradient = False
    counts_updates = True  # the bias correction's count
    setting_keys = {"lr": "inner.lr", "betas": "inner.betas", "eps": "inner.eps"}

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(self.betas))  # a list from a config compares equal, and hashes
        if len(self.betas) != 2 or not all(0 <= beta < 1 for beta in self.betas):
            raise SettingError("inner.betas", list(self.betas), "must be two numbers in [0, 1)")
        if not (self.eps > 0 and math.isfinite(self.eps)):
            raise SettingError("inner.eps", self.eps, "must be > 0")

    def init(self, weights: Params) -> State:
        return {"m": {name: torch.zeros_like(value) for name, value in weights.items()},
                "v": {name: torch.zeros_like(value) for name, value in weights.items()}}

    def step(self, weights, grads, state, learned, step):
        beta1, beta2 = self.betas
        if torch.is_tensor(step):
            return self._step_at(weights, grads, state, step)
        step_size = self.lr / (1 - beta1 ** (step + 1))
        root_scale = (1 - beta2 ** (step + 1)) ** -0.5
        # Fused forms (lerp for the moving averages, addcdiv for the update): each is one kernel in
        # the forward pass and in both backward passes, where Adam is otherwise a dozen per weight.
        m = {name: torch.lerp(grads[name], state["m"][name], beta1) for name in weights}
        v = {name: torch.lerp(grads[name] * grads[name], state["v"][name], beta2) for name in weights}
        # lr/c1 * m / (sqrt(v)/sqrt(c2) + eps) written as (lr/c1 * sqrt(c2)) * m / (sqrt(v) + eps * sqrt(c2)).
        new = {name: torch.addcdiv(value, m[name], torch.sqrt(v[name] + torch.finfo(v[name].dtype).tiny)
                                   + self.eps / root_scale, value=-step_size / root_scale)
               for name, value in weights.items()}
        return new, {"m": m, "v": v}

    def _step_at(self, weights, grads, state, step: torch.Tensor):
        """The same step at a counter held in a tensor (a run's own, online): the bias corrections are
        tensors, which addcdiv cannot take as its factor, so the update is written out."""
        beta1, beta2 = self.betas
        first = next(iter(weights.values()))
        count = (step + 1).to(first.dtype)
        root_scale = (1 - beta2 ** count) ** -0.5
        step_size = self.lr / (1 - beta1 ** count) / root_scale
        m = {name: torch.lerp(grads[name], state["m"][name], beta1) for name in weights}
        v = {name: torch.lerp(grads[name] * grads[name], state["v"][name], beta2) for name in weights}
        new = {name: value - step_size * m[name] / (torch.sqrt(v[name] + torch.finfo(v[name].dtype).tiny)
                                                     + self.eps / root_scale)
               for name, value in weights.items()}
        return new, {"m": m, "v": v}


_RULES = {rule.name: rule for rule in (SGD, MetaSGD, LSLR, Schedule, Momentum, Adam)}
RULES = tuple(_RULES)


def rule_settings(name: str) -> dict[str, str]:
    """The settings make_rule(name, ...) takes, each with the config key that sets it."""
    return dict(_RULES[name].setting_keys)


def make_rule(name: str, lr: float | None = None, steps: int | None = None, **settings) -> Rule:
    """The rule called `name` (one of RULES), built as its class is: make_rule("momentum", 0.1, momentum=0.8)
    is Momentum(lr=0.1, momentum=0.8); a setting left out keeps the class's default.

    `steps`, the inner steps the rule is made for, reaches only the rules whose learned parameters
    depend on it (lslr, schedule), so that one call fits every rule. A setting the rule does not take
    is refused in one line naming those it does."""
    if name not in _RULES:
        raise SettingError("inner.rule", name, f"must be one of {', '.join(RULES)}")
    keys = _RULES[name].setting_keys
    settings = {**({} if lr is None else {"lr": lr}), **settings}
    if steps is not None and "steps" in keys:
        settings["steps"] = steps
    unknown = sorted(set(settings) - set(keys))
    if unknown:
        raise SettingError(f"{name}.{unknown[0]}", settings[unknown[0]], f"is not a setting of the {name} rule "
                           f"(its settings: {', '.join(keys)})")
    return _RULES[name](**settings)
