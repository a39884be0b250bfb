"""Which of phi's tensors a hypergradient reaches: the check that a run can learn at all.

A tensor of phi whose hypergradient is exactly zero in every element does not move the outer loss
through anything the method differentiates: a detached outer loss, an inner loss that ignores phi,
no inner steps, weights saturated by their initial value. Training it would report success while
changing nothing, so the trainer refuses such a run on its first meta-batch and warns when a tensor
goes unreached for a whole logging window. Single zero elements are legitimate (the examples of a
hyper-cleaning weight vector that no mini-batch drew), so only whole tensors count. The check reads
a method's result, not an autograd path, so it holds every method alike.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from torch import nn


def reached_flags(grads: Sequence[torch.Tensor], device: torch.device | str | None = None) -> torch.Tensor:
    """One bool per tensor: whether any element of its hypergradient is non-zero (NaN counts as reached:
    divergence is another check's to flag). Stays on the device: no host sync. With no tensor (a
    problem with nothing to learn), an empty tensor on `device`."""
    if not grads:
        return torch.zeros(0, dtype=torch.bool, device=device)
    return torch.stack([grad.ne(0).any() for grad in grads])


def zero_at_start(model: nn.Module) -> list[str]:
    """The model's parameters whose hypergradient is exactly zero at their initial values by design,
    as its modules declare them in a `zero_at_start` attribute (names relative to the module): the
    layers behind a zero-initialised output layer (a learned activation that starts as ELU) get no
    gradient until that layer moves. The first meta-batch's check passes them; a whole logging window
    without a gradient still warns."""
    return [f"{prefix}.{name}" if prefix else name for prefix, module in model.named_modules()
            for name in getattr(module, "zero_at_start", ())]


def unreached(names: Iterable[str], flags: torch.Tensor, allowed: Sequence[str] = ()) -> list[str]:
    """The names whose flag is False, less those starting with a prefix in `allowed` (one host sync)."""
    prefixes = tuple(allowed)
    return [name for name, flag in zip(names, flags.tolist())
            if not flag and not (prefixes and name.startswith(prefixes))]
