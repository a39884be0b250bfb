"""A module as a pure function of an explicit parameter dict."""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.func import functional_call

Params = dict[str, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MODES = ("second_order", "first_order", "truncated", "implicit")


def functional_forward(model: nn.Module, params: Params, x: torch.Tensor) -> torch.Tensor:
    """model(x) computed with `params` in place of the module's own parameters."""
    return functional_call(model, params, (x,))


def detached(params: Params) -> Params:
    """The same values cut from the graph: the inner loop treats them as constants."""
    return {name: value.detach() for name, value in params.items()}


def differentiated_steps(mode: str, inner_steps: int, truncate: int | None = None) -> int:
    """How many of the last inner steps the meta-gradient backpropagates through.

    The other, earlier steps still move the weights, but their Jacobian is taken as the identity
    (their inner gradients are constants): 0 differentiated steps is first-order MAML, all K is
    full second-order MAML, and truncated mode interpolates between the two.
    """
    if mode == "second_order":
        return inner_steps
    if mode == "first_order":
        return 0
    if mode == "truncated":
        if truncate is None or not 0 <= truncate <= inner_steps:
            raise ValueError(f"truncated mode needs 0 <= truncate <= inner_steps ({inner_steps}), got {truncate}")
        return truncate
    if mode == "implicit":
        raise ValueError("mode 'implicit' differentiates no inner steps (its inner loop is regularised towards "
                         "theta and keeps no graph): use meta_gradient(..., mode='implicit', implicit=...) or "
                         "distmaml.meta.implicit.regularised_adapt")
    raise ValueError(f"mode must be one of {', '.join(MODES[:3])} here, got {mode!r}")
