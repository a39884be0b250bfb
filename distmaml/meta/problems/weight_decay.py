"""Learned L2 weight decay: phi holds the log of a decay per weight (or per tensor, or one for all).

    inner_loss(w, phi, task, k) = L_train(w; step k's batch) + 1/2 sum_j exp(phi_j) w_j^2

over the weight matrices and convolution kernels (biases and normalisation parameters are not
decayed, as usual). The decay enters the inner loss, so the solution of the inner problem depends
on it: every hypergradient method applies, the implicit ones included (Lorraine et al. 2020 learn
one decay per weight this way). The log keeps every decay positive.

`per`: "weight" (one decay per weight element), "input" (one per input element of each weight,
shared by its outputs: per-feature decay for a logistic regression), "tensor", or "global".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from distmaml.meta.functional import Params
from distmaml.errors import SettingError
from distmaml.meta.problems.training import TrainingRun

PREFIX = "log_decay."
GRANULARITIES = ("weight", "input", "tensor", "global")


@dataclass(frozen=True, eq=False)
class WeightDecay(TrainingRun):
    per: str = "weight"
    initial: float = 1e-3

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.per not in GRANULARITIES:
            raise SettingError("weight_decay.per", self.per, f"must be one of {', '.join(GRANULARITIES)}")
        if not (self.initial > 0 and math.isfinite(math.log(self.initial))):
            raise SettingError("weight_decay.init", self.initial, "must be > 0")
        decayed = tuple(name for name, value in self.template.items() if value.dim() >= 2)
        if not decayed:
            raise SettingError("problem.name", "weight_decay", "the model has no weight matrix or kernel to decay")
        object.__setattr__(self, "decayed", decayed)

    def _shape(self, value: torch.Tensor) -> tuple[int, ...]:
        return {"weight": tuple(value.shape), "input": tuple(value.shape[1:]), "tensor": (), "global": ()}[self.per]

    def meta_parameters(self) -> Params:
        return {**super().meta_parameters(), **self.decay_parameters()}

    def decay_parameters(self) -> Params:
        if self.per == "global":
            value = self.template[self.decayed[0]]
            return {PREFIX + "all": torch.full((), math.log(self.initial), dtype=value.dtype, device=value.device)}
        return {PREFIX + name: torch.full(self._shape(self.template[name]), math.log(self.initial),
                                          dtype=self.template[name].dtype, device=self.template[name].device)
                for name in self.decayed}

    def decays(self, phi: Params) -> dict[str, torch.Tensor]:
        """Each decayed weight's decay (broadcastable against the weight)."""
        if self.per == "global":
            return {name: phi[PREFIX + "all"].exp() for name in self.decayed}
        return {name: phi[PREFIX + name].exp() for name in self.decayed}

    def describe(self, phi: Params) -> dict:
        return {"weight_decay": {name: decay.detach().tolist() for name, decay in self.decays(phi).items()}}

    def inner_loss(self, weights: Params, phi: Params, task: Any, step: int) -> torch.Tensor:
        penalty = sum((decay * weights[name] ** 2).sum() for name, decay in self.decays(phi).items())
        return self.training_loss(weights, phi, task, step) + 0.5 * penalty
