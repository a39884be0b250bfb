"""The one adaptation routine: every task of a batch adapts together, one vmap per inner step.

Each inner step is a vmap over tasks of a pure per-task step: the inner gradient by
torch.func.grad over functional_call, then the update rule (distmaml.meta.rules). The steps are an
ordinary Python loop over K, so the meta-gradient is plain autograd through that loop, and a mode
chooses per step what the backward pass sees: a differentiated step's gradient keeps its graph
(second order), a first-order step's gradient is taken at detached weights (a constant). Stretches
of differentiated steps may be recomputed in the backward pass instead of stored
(distmaml.meta.checkpointing). This is functorch's MAML recipe, arranged by step rather than by
task so that truncation and recomputation can choose per step.

Training, evaluation, plots and the benchmarks all adapt through `adapt`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn
from torch.func import grad, vmap

from distmaml.meta.checkpointing import check_recomputable, plan_segments, recomputed
from distmaml.meta.functional import LossFn, Params, detached, differentiated_steps, functional_forward, mse
from distmaml.meta.rules import LEARNED, SGD, Rule


@dataclass(frozen=True)
class Inner:
    """How each task adapts: the update rule, the unroll, and what the meta-gradient sees of it.

    `adapt` lists name prefixes of the weights the inner loop adapts (ANIL: the head); () adapts
    all. The others keep theta's values in every inner step but are still meta-trained through
    the query loss. `implicit` holds iMAML's settings (lam, cg_steps, cg_damping, cg_tol,
    inner_safeguard) for mode "implicit".
    """

    rule: Rule = field(default_factory=lambda: SGD(0.01))
    steps: int = 1
    loss_fn: LossFn = mse
    mode: str = "second_order"
    truncate: int | None = None
    checkpoint: str = "none"
    checkpoint_segment: int | None = None
    adapt: tuple[str, ...] = ()
    implicit: dict[str, Any] | None = None


class Adapted(NamedTuple):
    """Weights after adaptation. `adapted` has a leading task dimension once a step has run
    (batched); `fixed` are the weights the inner loop does not adapt (theta's, shared)."""

    adapted: Params
    fixed: Params
    batched: bool
    trajectory: list[Params]  # the adapted weights after each step (with trajectory=True)

    def weights(self, num_tasks: int) -> Params:
        """Every weight of the model with a leading task dimension (fixed ones as expanded views)."""
        out = {name: value.expand(num_tasks, *value.shape) for name, value in self.fixed.items()}
        for name, value in self.adapted.items():
            out[name] = value if self.batched else value.expand(num_tasks, *value.shape)
        return out


def split(theta: Params, prefixes: tuple[str, ...] = ()) -> tuple[Params, Params, Params]:
    """(adapted weights, fixed weights, learned rule parameters) of a meta-parameter dict."""
    learned = {name: value for name, value in theta.items() if name.startswith(LEARNED)}
    weights = {name: value for name, value in theta.items() if not name.startswith(LEARNED)}
    if not prefixes:
        return weights, {}, learned
    adapted = {name: value for name, value in weights.items() if name.startswith(prefixes)}
    return adapted, {name: value for name, value in weights.items() if name not in adapted}, learned


def _task_step(model: nn.Module, inner: Inner, step: int, differentiable: bool):
    """One task's inner step (adapted, state, learned, fixed, support_x, support_y) -> (adapted, state)."""

    def task_step(adapted: Params, state, learned: Params, fixed: Params, support_x: torch.Tensor,
                  support_y: torch.Tensor):
        # A first-order step takes its gradient at detached weights, fixed ones included: the
        # update still moves the weights, the backward pass treats the gradient as a constant.
        frozen = fixed if differentiable else detached(fixed)

        def support_loss(point: Params) -> torch.Tensor:
            return inner.loss_fn(functional_forward(model, {**frozen, **point}, support_x), support_y)

        grads = grad(support_loss)(adapted if differentiable else detached(adapted))
        return inner.rule.step(adapted, grads, state, learned, step)

    return task_step


def adapt(model: nn.Module, theta: Params, support_x: torch.Tensor, support_y: torch.Tensor, inner: Inner, *,
          steps: int | None = None, differentiated: int | None = None, trajectory: bool = False) -> Adapted:
    """Adapt shared meta-parameters `theta` (weights and learned rule parameters) to every task at once.

    `steps` defaults to inner.steps; `differentiated` (the last steps whose inner gradients keep
    their graph) defaults to what inner.mode says. With `trajectory` the adapted weights after
    every step are kept too (MAML++'s multi-step loss, evaluation curves). inner.checkpoint makes
    the differentiated steps recompute in the backward pass; results and gradients are unchanged.
    """
    steps = inner.steps if steps is None else steps
    if differentiated is None:
        differentiated = differentiated_steps(inner.mode, steps, inner.truncate)
    first_differentiated = steps - differentiated
    plan = plan_segments(steps, differentiated, inner.checkpoint, inner.checkpoint_segment)
    if any(checkpointed for _, _, checkpointed in plan):
        check_recomputable(model)
    adapted, fixed, learned = split(theta, inner.adapt)
    learned_at = _per_step(learned, steps, along_steps=inner.rule.per_step)
    fixed_at = _per_step(fixed, steps)
    state = inner.rule.init(adapted)
    batched, visited = False, []
    for start, end, checkpointed in plan:
        def segment(inputs: dict, support_x: torch.Tensor, support_y: torch.Tensor, start: int = start,
                    end: int = end, batched: bool = batched) -> dict:
            adapted, state, trail = inputs["adapted"], inputs["state"], []
            for step in range(start, end):
                update = _task_step(model, inner, step, differentiable=step >= first_differentiated)
                dims = 0 if batched or step > start else None
                adapted, state = vmap(update, in_dims=(dims, dims, None, None, 0, 0))(
                    adapted, state, inputs["learned"][step - start], inputs["fixed"][step - start], support_x,
                    support_y)
                if trajectory or step == end - 1:
                    trail.append(adapted)
            return {"state": state, "trail": trail}

        inputs = {"adapted": adapted, "state": state, "learned": learned_at[start:end], "fixed": fixed_at[start:end]}
        out = (recomputed(segment, inputs, support_x, support_y) if checkpointed
               else segment(inputs, support_x, support_y))
        state, adapted, batched = out["state"], out["trail"][-1], True
        visited += out["trail"] if trajectory else []
    return Adapted(adapted, fixed, batched, visited)


def _per_step(params: Params, steps: int, along_steps: bool = False) -> list[Params]:
    """One view of `params` for each inner step.

    A tensor every step reads (a learned step size, a weight ANIL holds fixed) gets one gradient
    contribution per step. Summed as autograd meets them, their order -- and so the last bits --
    would depend on how the unroll is split into recomputed segments. Each step reads its own view
    of expand(K).unbind instead: its contribution lands in its own slot, exactly, and the K slots
    are reduced by one sum, the same for any segmentation (checkpointed = stored, bit for bit).
    With `along_steps` the tensors already hold one entry per step (LSLR): step k reads entry k
    (the last one past the end, as when a test adapts for longer than training did).
    """
    if along_steps:
        slices = {name: value.unbind(0) for name, value in params.items()}
        return [{name: slices[name][min(step, len(slices[name]) - 1)] for name in params} for step in range(steps)]
    slices = {name: value.expand(steps, *value.shape).unbind(0) for name, value in params.items()}
    return [{name: slices[name][step] for name in params} for step in range(steps)]


def task_losses(model: nn.Module, result: Adapted, x: torch.Tensor, y: torch.Tensor,
                loss_fn: LossFn = mse, adapted: Params | None = None) -> torch.Tensor:
    """[n] loss of each task's weights on its own points (`adapted` replaces result.adapted, e.g. a
    point of the trajectory)."""
    adapted = result.adapted if adapted is None else adapted

    def loss(point: Params, fixed: Params, task_x: torch.Tensor, task_y: torch.Tensor) -> torch.Tensor:
        return loss_fn(functional_forward(model, {**fixed, **point}, task_x), task_y)

    return vmap(loss, in_dims=(0 if result.batched else None, None, 0, 0))(adapted, result.fixed, x, y)
