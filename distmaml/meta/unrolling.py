"""The inner loop of every task at once: every task's inner step together, plain autograd through the loop.

The first step is one vmap over tasks of the whole per-task step (problem.start, the inner
gradient by torch.func.grad, the update rule of distmaml.meta.rules), so weights that do not
depend on the task (MAML's phi) stay unbatched there and the first forward is one matmul over all
tasks. Every later step runs the inner loss under vmap for the forward pass only and takes all
tasks' gradients at once as the gradient of their summed losses (inner_gradients), then the rule.
The steps are an ordinary Python loop over K, so a hypergradient method is plain
autograd through it, and each step chooses what the backward pass sees: a differentiated step's
gradient keeps its graph (second order), another step's gradient is taken at detached weights and
meta-parameters (a constant: first order). Stretches of differentiated steps may be recomputed in
the backward pass instead of stored (distmaml.meta.checkpointing), bit for bit.

This is functorch's MAML recipe, arranged by step rather than by task so that truncation and
recomputation can choose per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Collection, NamedTuple

import torch
from torch.func import grad, vmap

from distmaml.meta.checkpointing import check_recomputable, plan_segments, recomputed
from distmaml.meta.functional import Params, Tasks, detached
from distmaml.meta.rules import LEARNED, Rule

State = dict[str, Params]


class Unrolled(NamedTuple):
    """Every task's inner weights after the last step (task dimension first), the rule's state then,
    and the weights after the steps `trajectory` asked for (all of 1..K with trajectory=True)."""

    weights: Params
    state: State
    trajectory: list[Params]


def step_views(phi: Params, steps: int, rule: Rule) -> Sequence[Params]:
    """One view of phi for each inner step.

    A tensor every step reads (a weight ANIL holds fixed, iMAML's pull towards phi, a learned
    decay or step size) gets one gradient contribution per step. Summed as autograd meets them,
    their order -- and so the last bits -- would depend on how the unroll is split into recomputed
    segments. Each step reads its own view of expand(K).unbind instead: its contribution lands in
    its own slot, exactly, and the K slots are reduced by one sum, the same for any segmentation
    (checkpointed = stored, bit for bit). A rule whose learned parameters hold one entry per step
    (LSLR) hands step k entry k (the last one past the end, when a test adapts for longer).

    Without autograd (evaluation) there are no contributions to keep apart: the views are made as
    the steps ask for them, so that adapting for a very long time needs no list of K views.
    """
    if not torch.is_grad_enabled():
        return _StepViews(phi, rule.per_step, range(steps))
    slices = {}
    for name, value in phi.items():
        along_steps = rule.per_step and name.startswith(LEARNED)
        slices[name] = value.unbind(0) if along_steps else value.expand(steps, *value.shape).unbind(0)
    return [{name: parts[min(step, len(parts) - 1)] for name, parts in slices.items()} for step in range(steps)]


class _StepViews(Sequence):
    """step_views' values for the steps in `steps`, each made when indexed (slices stay lazy)."""

    def __init__(self, phi: Params, per_step: bool, steps: range):
        self.phi, self.per_step, self.steps = phi, per_step, steps

    def __len__(self) -> int:
        return len(self.steps)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _StepViews(self.phi, self.per_step, self.steps[index])
        step = self.steps[index]
        return {name: value[min(step, len(value) - 1)] if self.per_step and name.startswith(LEARNED) else value
                for name, value in self.phi.items()}


def inner_gradients(problem: Any, weights: Params, phi: Params, tasks: Tasks, step: int,
                    keep_graph: bool) -> Params:
    """Every task's inner gradient at once: the gradient of the sum of the tasks' inner losses with
    respect to the stacked weights (task dimension first). Tasks share no weights, so slice i of that
    gradient is task i's own gradient. The forward pass is one vmap over tasks; the backward pass is
    plain autograd on the batched operations it recorded, which keeps their memory layout (a
    torch.func.grad inside the vmap runs its backward through vmap's batching rules instead, at a
    cost: docs/design.md, "Batched steps").

    With `keep_graph` the gradient keeps its graph to the weights and phi (a differentiated step, with
    grad mode on); otherwise it is a constant, taken at detached weights (a first-order step, or a
    forward pass that records nothing: evaluation, a recomputed segment's first run)."""
    with torch.enable_grad():
        point = {name: value if keep_graph and value.requires_grad else value.detach().requires_grad_()
                 for name, value in weights.items()}
        losses = vmap(problem.inner_loss, in_dims=(0, None, 0, None))(point, phi, tasks, step)
        found = torch.autograd.grad(losses.sum(), list(point.values()), create_graph=keep_graph, allow_unused=True)
    # A weight the inner loss does not read has a zero gradient, as torch.func.grad gives it.
    return {name: torch.zeros_like(value) if gradient is None else gradient
            for (name, value), gradient in zip(point.items(), found)}


def inner_step(problem: Any, rule: Rule, weights: Params, state: State, phi: Params, tasks: Tasks, step: int,
               differentiable: bool) -> tuple[Params, State]:
    """Every task's inner step `step` at once: the inner gradients, then the rule (vmapped over tasks).

    A first-order step (not `differentiable`) takes its gradient at detached weights and
    meta-parameters: the update still moves the weights (and reads learned step sizes), the
    backward pass treats the gradient as a constant."""
    keep_graph = differentiable and torch.is_grad_enabled()
    grads = inner_gradients(problem, weights, phi if differentiable else detached(phi), tasks, step, keep_graph)
    return vmap(rule.step, in_dims=(0, 0, 0, None, None))(weights, grads, state, phi, step)


def starting_state(problem: Any, rule: Rule, phi: Params, task: Any, weights: Params) -> State:
    """The rule's state before a task's first step: rule.init(weights), or the state the problem
    resumes from where it has one (a persistent run: distmaml.meta.online)."""
    resumed = getattr(problem, "start_state", None)
    return rule.init(weights) if resumed is None else resumed(phi, task)


def first_step(problem: Any, rule: Rule, phi: Params, tasks: Tasks, differentiable: bool) -> tuple[Params, State]:
    """Every task's first inner step, from problem.start(phi, task), in one vmap of the whole per-task step.

    Starting weights that do not depend on the task (MAML's phi) stay unbatched inside it, so the
    first forward pass is one matmul or convolution over all tasks' examples, and torch.func.grad
    gives each task its own gradient of them; from the second step on every task has weights of
    its own and inner_step takes over."""

    def task_step(phi: Params, task: Any) -> tuple[Params, State]:
        weights = problem.start(phi, task)
        state = starting_state(problem, rule, phi, task, weights)
        at_phi = phi if differentiable else detached(phi)
        grads = grad(lambda point: problem.inner_loss(point, at_phi, task, 0))(
            weights if differentiable else detached(weights))
        return rule.step(weights, grads, state, phi, 0)

    return vmap(task_step, in_dims=(None, 0))(phi, tasks)


def start_weights(problem: Any, phi: Params, tasks: Tasks) -> Params:
    """Every task's starting weights, task dimension first."""
    return vmap(problem.start, in_dims=(None, 0))(phi, tasks)


def unroll(problem: Any, phi: Params, tasks: Tasks, inner, *, steps: int | None = None,
           differentiated: int | None = None, trajectory: bool | Collection[int] = False) -> Unrolled:
    """Run the inner loop of every task in `tasks` from problem.start(phi, task).

    `inner` gives the rule, the number of steps (`steps` overrides it), and the recomputation
    plan; `differentiated` (the last steps whose inner gradients keep their graph) defaults to what
    inner.method says. With `trajectory` the weights after every step are kept too (MAML++'s
    multi-step loss), or after the numbers of steps it lists (evaluation curves of long unrolls).
    Results and gradients do not depend on inner.checkpoint.
    """

    def kept(done: int) -> bool:
        return trajectory is True or (not isinstance(trajectory, bool) and done in trajectory)

    rule = inner.rule
    steps = inner.steps if steps is None else steps
    if differentiated is None:
        differentiated = inner.method.differentiated(steps)
    if steps == 0:
        weights = start_weights(problem, phi, tasks)
        resumed = getattr(problem, "start_state", None)
        state = rule.init(weights) if resumed is None else vmap(resumed, in_dims=(None, 0))(phi, tasks)
        return Unrolled(weights, state, [])
    first_differentiated = steps - differentiated
    plan = plan_segments(steps, differentiated, inner.checkpoint, inner.checkpoint_segment)
    if any(checkpointed for _, _, checkpointed in plan) and hasattr(problem, "model"):
        check_recomputable(problem.model)
    phi_at = step_views(phi, steps, rule)
    report = getattr(inner, "progress", None)
    carried: dict[str, Any] = {}
    visited: list[Params] = []
    for start, end, checkpointed in plan:
        # A plain segment reports each step; a checkpointed one once, after its forward pass (its
        # recomputation in the backward pass reports nothing).
        step_report = None if checkpointed else report

        def segment(inputs: dict, tasks: Tasks, start: int = start, end: int = end,
                    step_report=step_report) -> dict:
            weights, state, trail = inputs.get("weights"), inputs.get("state"), []
            for step in range(start, end):
                differentiable = step >= first_differentiated
                views = inputs["phi"][step - start]
                if weights is None:
                    weights, state = first_step(problem, rule, views, tasks, differentiable)
                else:
                    weights, state = inner_step(problem, rule, weights, state, views, tasks, step, differentiable)
                if kept(step + 1) or step == end - 1:
                    trail.append(weights)
                if step_report is not None:
                    step_report(step + 1)
            return {"state": state, "trail": trail}

        inputs = {**carried, "phi": phi_at[start:end]}
        out = recomputed(segment, inputs, tasks) if checkpointed else segment(inputs, tasks)
        if checkpointed and report is not None:
            report(end)
        carried = {"weights": out["trail"][-1], "state": out["state"]}
        done = [step + 1 for step in range(start, end) if kept(step + 1) or step == end - 1]
        visited += [weights for count, weights in zip(done, out["trail"]) if kept(count)]
    return Unrolled(carried["weights"], carried["state"], visited)


def task_values(fn, weights: Params, phi: Params, tasks: Tasks):
    """fn(weights_i, phi, task_i) of every task (a loss: [n]; a dict of metrics: {name: [n]})."""
    return vmap(fn, in_dims=(0, None, 0))(weights, phi, tasks)
