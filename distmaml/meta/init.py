"""Fresh initial weights drawn from a task's key: a batch of tasks is a batch of random initialisations.

Hyperparameter learning and dataset distillation measure phi by training a network from scratch:
each task starts from its own random weights. They are drawn counter-based (distmaml.rng), a pure
function of the task's key, so any process can build any task's initialisation (world-size
invariance), a recomputed inner segment draws the same weights again, and the draw runs inside
vmap and on any device.

The distribution is PyTorch's default for linear and convolutional layers (kaiming_uniform with
a = sqrt(5)): weights and their biases uniform in +-1/sqrt(fan_in). Tensors of other shapes (a
normalisation layer's scale and shift) keep the template's values.
"""

from __future__ import annotations

import math

import torch

from distmaml.meta.functional import Params
from distmaml.rng import uniform

LANE_INIT = 7  # keeps initialisation draws apart from anything else a task's key is used for


def init_bounds(template: Params) -> dict[str, float | None]:
    """Each tensor's uniform bound 1/sqrt(fan_in), or None where the template's value is kept."""
    bounds: dict[str, float | None] = {}
    for name, value in template.items():
        owner = name[: -len("bias")] + "weight" if name.endswith("bias") else None
        if value.dim() >= 2:
            bounds[name] = 1.0 / math.sqrt(math.prod(value.shape[1:]))
        elif owner is not None and owner in template and template[owner].dim() >= 2:
            bounds[name] = 1.0 / math.sqrt(math.prod(template[owner].shape[1:]))
        else:
            bounds[name] = None
    return bounds


def fresh_weights(template: Params, key: torch.Tensor, bounds: dict[str, float | None] | None = None) -> Params:
    """One task's initial weights for key `key` (an int64 scalar holding a 32-bit word)."""
    bounds = init_bounds(template) if bounds is None else bounds
    out = {}
    for index, (name, value) in enumerate(template.items()):
        bound = bounds[name]
        if bound is None:
            out[name] = value.detach()
            continue
        element = torch.arange(value.numel(), device=value.device)
        draw = uniform(-bound, bound, key, LANE_INIT, index, element, dtype=value.dtype, device=value.device)
        out[name] = draw.reshape(value.shape)
    return out
