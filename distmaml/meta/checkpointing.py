"""Activation checkpointing of the inner loop: keep a segment's input weights, recompute its steps later.

Full second-order MAML keeps the graph of every inner step (forward, inner gradient, update) for the
meta-backward: memory grows as K x tasks x activations. A checkpointed segment instead runs its steps
without a graph, keeps only the (batched) weights it started from, and recomputes its steps, this
time with a graph, when the meta-backward reaches it. Segments of about sqrt(K) steps keep
O(sqrt(K)) weight copies plus one segment's graph, at the cost of one more forward of the inner loop.

The recomputation is a hand-written torch.autograd.Function around a stretch of the batched engine's
step loop (outside vmap). torch.utils.checkpoint does not fit: its non-reentrant form works through
saved-tensor hooks, which torch.func.grad refuses ("don't yet support saved tensor hooks", torch 2.13),
and its reentrant form does not support torch.autograd.grad, which the engine uses.

Recomputation must repeat exactly what the forward did. The inner steps are deterministic functions of
(weights, support set): no random operations (vmap's default randomness='error' refuses them), and
normalisation layers use batch statistics only (BatchNorm(track_running_stats=False), which has no
buffers), so running a segment twice updates no state twice.
`check_recomputable` rejects a model whose normalisation layers would update running statistics.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

CHECKPOINTS = ("none", "every_step", "segments", "auto")

Segment = tuple[int, int, bool]  # (first step, one past the last step, recomputed in the backward pass)


def plan_segments(inner_steps: int, differentiated: int, checkpoint: str = "none",
                  segment: int | None = None) -> list[Segment]:
    """Split the inner steps 0..inner_steps-1 into consecutive segments (start, end, checkpointed).

    The first `inner_steps - differentiated` steps (truncated mode's first-order head; all of them in
    first-order mode) keep no second-order graph, so they form one plain segment. The differentiated
    tail is one plain segment for checkpoint='none', else checkpointed segments of 1 step
    ('every_step'), `segment` steps ('segments') or about sqrt(differentiated) steps ('auto'); the last
    segment may be shorter. Empty segments are left out, so 0 inner steps give [].
    """
    if checkpoint not in CHECKPOINTS:
        raise ValueError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {checkpoint!r}")
    if not 0 <= differentiated <= inner_steps:
        raise ValueError(f"differentiated steps must be between 0 and inner_steps ({inner_steps}), "
                         f"got {differentiated}")
    if checkpoint == "segments" and segment is None:
        raise ValueError("checkpoint='segments' needs a segment length")
    if segment is not None and segment < 1:
        raise ValueError(f"checkpoint segment length must be >= 1, got {segment}")

    first_differentiated = inner_steps - differentiated
    plan: list[Segment] = [(0, first_differentiated, False)] if first_differentiated > 0 else []
    if differentiated == 0:
        return plan
    if checkpoint == "none":
        return plan + [(first_differentiated, inner_steps, False)]
    length = {"every_step": 1, "segments": segment, "auto": max(1, round(math.sqrt(differentiated)))}[checkpoint]
    return plan + [(start, min(start + length, inner_steps), True)
                   for start in range(first_differentiated, inner_steps, length)]


def check_recomputable(model: nn.Module) -> None:
    """Raise ValueError if running the model twice on the same input would change its state.

    In training mode a normalisation layer that tracks running statistics updates them on every
    forward; recomputing a segment would count its batches twice.
    """
    for name, module in model.named_modules():
        if module.training and getattr(module, "track_running_stats", False):
            raise ValueError(f"inner-loop checkpointing recomputes forward passes, which would update the running "
                             f"statistics of {name or 'the model'} ({type(module).__name__}) twice: build it with "
                             f"track_running_stats=False (batch statistics) or use checkpoint='none'")


def recomputed(segment_fn: Callable[..., Any], inputs: Any, data: Any) -> Any:
    """segment_fn(inputs, data), keeping only its inputs for the backward pass, which reruns it.

    `inputs` is any tree (dicts, lists) of tensors: the weights a segment starts from, the rule's
    state, the per-step views of the meta-parameters. Every tensor the segment reads must be
    passed here rather than captured, so that its gradient is computed by the recomputation
    instead of silently dropped; `data` (the tasks, any tree of tensors) likewise. The result is a
    tree of new tensors (never one of the inputs).
    """
    leaves, spec = tree_flatten(inputs)
    data_leaves, data_spec = tree_flatten(data)
    result_spec = []

    def flat_fn(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        result = segment_fn(tree_unflatten(list(tensors[:len(leaves)]), spec),
                            tree_unflatten(list(tensors[len(leaves):]), data_spec))
        flat, structure = tree_flatten(result)
        result_spec[:] = [structure]
        return tuple(flat)

    outputs = _Recompute.apply(flat_fn, *leaves, *data_leaves)
    return tree_unflatten(list(outputs), result_spec[0])


class _Recompute(torch.autograd.Function):
    """outputs = fn(*inputs), storing inputs only; the backward pass reruns fn with a graph."""

    @staticmethod
    def forward(ctx, fn, *inputs):
        ctx.fn = fn
        ctx.save_for_backward(*inputs)
        ctx.set_materialize_grads(False)  # outputs nobody differentiated need no recomputed backward
        # Function.forward runs without recording a graph, yet torch.func.grad inside fn still
        # computes the inner gradients: a function transform ignores an outer no_grad.
        return fn(*inputs)

    @staticmethod
    def backward(ctx, *output_grads):
        # A graph of this backward (create_graph=True: grad mode is on here) would need the recomputed
        # steps tied to the original inputs. once_differentiable is no guard: its error node is skipped
        # when the second derivative is taken with respect to the weights, which then silently get None.
        if torch.is_grad_enabled():
            raise RuntimeError("inner-loop checkpointing cannot differentiate the meta-gradient again "
                               "(create_graph=True); use checkpoint='none' for higher derivatives")
        needs_grad = ctx.needs_input_grad[1:]
        inputs = [saved.detach().requires_grad_(needs) for saved, needs in zip(ctx.saved_tensors, needs_grad)]
        with torch.enable_grad():
            outputs = ctx.fn(*inputs)
        pairs = [(output, grad) for output, grad in zip(outputs, output_grads)
                 if grad is not None and output.requires_grad]
        wanted = [tensor for tensor in inputs if tensor.requires_grad]
        if not pairs or not wanted:
            return (None,) * (1 + len(inputs))
        grads = iter(torch.autograd.grad([output for output, _ in pairs], wanted, [grad for _, grad in pairs],
                                         allow_unused=True))
        return (None, *(next(grads) if tensor.requires_grad else None for tensor in inputs))
