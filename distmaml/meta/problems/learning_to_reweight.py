"""Learning to Reweight (Ren et al. 2018): every mini-batch's example weights from a one-step lookahead.

At each inner step, with eps = 0 the weights of the batch's examples in the unweighted sum
sum_i eps_i l_i(w):

    w'(eps)  = w - alpha grad_w sum_i eps_i l_i(w)                 (the lookahead step)
    g_i      = d L_val(w'(eps)) / d eps_i  at eps = 0
    weight_i = max(-g_i, 0) / sum_j max(-g_j, 0)                   (all zero when every entry is)
    inner_loss(w, phi, task, k) = sum_i weight_i l_i(w)            (weights held constant)

Nothing persists between steps: the weights are the batch's own, and phi is empty (unless the
model's shared parameters are learned beside them). At eps = 0 the lookahead does not move, so
g_i = -alpha grad L_val(w) . grad l_i(w): alpha scales every g_i alike and the normalisation removes
it; it is 1 here. The outer loss is the clean validation split's (Ren et al. draw a validation
mini-batch per step; the whole split is the same in expectation and small here). It runs online
only: its runs are the result (the network trained with the reweighted steps), there is no
episode whose end phi would be measured by.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import grad

from distmaml.meta.functional import Params, detached
from distmaml.meta.problems.reweighting import Reweighting
from distmaml.meta.problems.training import TrainingRun


@dataclass(frozen=True, eq=False)
class LearningToReweight(Reweighting):
    learned_name = "learning_to_reweight"
    headline = ()
    modes = ("online",)
    without_phi = True  # nothing to learn: its runs, reweighted step by step, are the result

    def _check_initial_weights(self) -> None:
        pass  # no learned weights: each batch's are computed afresh

    def meta_parameters(self) -> Params:
        return TrainingRun.meta_parameters(self)

    def example_weights(self, weights: Params, phi: Params, task: Any, step) -> torch.Tensor:
        """The batch's L2RW weights at the (detached) weights `weights`: [batch], summing to 1 or all 0."""
        x, y = self.batch(task, step)
        base = detached(weights)
        constants = detached(phi)

        def validation_after(eps: torch.Tensor) -> torch.Tensor:
            def weighted(point: Params) -> torch.Tensor:
                return (eps * F.cross_entropy(self.predict(point, constants, x), y, reduction="none")).sum()

            step_grad = grad(weighted)(base)
            return self.outer_loss({name: base[name] - step_grad[name] for name in base}, constants, task)

        found = grad(validation_after)(torch.zeros(x.shape[0], dtype=x.dtype, device=x.device))
        raw = torch.clamp(-found, min=0)
        total = raw.sum()
        return torch.where(total > 0, raw / torch.where(total > 0, total, torch.ones_like(total)), raw)

    def inner_loss(self, weights: Params, phi: Params, task: Any, step) -> torch.Tensor:
        x, y = self.batch(task, step)
        weight = self.example_weights(weights, phi, task, step).detach()
        return (weight * F.cross_entropy(self.predict(weights, phi, x), y, reduction="none")).sum()

    def describe(self, phi: Params) -> dict:
        return {}
