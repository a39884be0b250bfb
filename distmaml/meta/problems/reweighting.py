"""Learned per-example weights: cleaning noisy labels by bi-level optimisation (data hyper-cleaning,
Franceschi et al. 2017; learning to reweight, Ren et al. 2018).

    phi_i = the logit of training example i's weight sigma(phi_i)
    inner_loss(w, phi, task, k) = sum_i sigma(phi_i) * l_i(w) / sum_i sigma(phi_i) over step k's batch
                                  (normalised, Ren et al. 2018), or the mean of sigma(phi_i) * l_i(w)
    outer_loss(w, phi, task)    = the loss on a clean validation split

An example whose label was flipped pulls the network away from the clean validation set, so its
weight's hypergradient pushes it down: after meta-training, sigma(phi_i) < 1/2 marks a detected flip.
The weights enter the inner loss, so every hypergradient method applies (the implicit ones too).
Normalised, the weights decide which examples the network learns from but not how fast it learns:
with the plain mean, weighing down the flipped half of the data also halves the effective step
size, and the network trained on the learned weights ends its steps less trained than the baselines.
`flipped` (which labels the data set flipped, when known) lets describe() report how well the
learned weights find them; `baselines` are the standard comparisons: training on everything
("noisy"), on the clean validation split alone, and on only the examples whose labels are right
("oracle").
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distmaml.errors import SettingError
from distmaml.meta.functional import Params
from distmaml.meta.problems.training import Dataset, TrainingRun

NAME = "example_logit"


@dataclass(frozen=True, eq=False)
class Reweighting(TrainingRun):
    initial: float = 0.0  # every weight starts at sigma(initial)
    normalised: bool = True  # a batch's loss is divided by its total weight, not by its size
    flipped: torch.Tensor | None = None

    learned_name = "learned_weights"  # what evaluation calls the learned run beside its baselines
    headline = ("flip_detection",)  # what evaluation reports at the top of its result
    stopped_baselines = ("noisy",)  # reported at its best validation accuracy (and its last step beside it)
    needs_class_logits = True  # the inner loss is a cross-entropy per example, over the model's class logits

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.normalised:
            self._check_initial_weights()

    def _check_initial_weights(self) -> None:
        """The normalised loss divides by the total weight, and its hypergradient by the total weight
        squared; sigma(x) ~ exp(x) for x << 0. Below the square root of the dtype's smallest normal
        number that square flushes to 0 (a batch may hold a single example, whose weight is the total),
        and the first step is 0/0."""
        dtype = self.data.train_x.dtype
        tiny = torch.finfo(dtype).tiny
        lowest = math.log(tiny) / 2
        if self.initial >= lowest:
            return
        name = str(dtype).removeprefix("torch.")
        if self.initial < math.log(tiny):
            what = f"which underflows to 0 in {name} (the run's dtype), so the normalised loss sum w_i l_i / sum w_i"
        else:
            what = (f"whose square underflows to 0 in {name} (the run's dtype), so the hypergradient of the normalised "
                    "loss sum w_i l_i / sum w_i, which divides by the total weight squared,")
        raise SettingError("hyperclean.init", self.initial, f"every weight starts at sigmoid({self.initial:g}), "
                           f"{what} is 0/0; give hyperclean.init >= {math.ceil(lowest)} (sigmoid({lowest:.1f})"
                           f" squared is {name}'s smallest normal number, {tiny:.1e})")

    def meta_parameters(self) -> Params:
        train = self.data.train_x
        return {**super().meta_parameters(),
                NAME: torch.full((train.shape[0],), float(self.initial), dtype=train.dtype, device=train.device)}

    def inner_loss(self, weights: Params, phi: Params, task: Any, step: int) -> torch.Tensor:
        index = self.batch_index(task, step)
        x, y = self.batch(task, step)
        logits = phi[NAME] if index is None else phi[NAME][index]
        per_example = F.cross_entropy(self.predict(weights, phi, x), y, reduction="none")
        weight = torch.sigmoid(logits)
        if self.normalised:
            return (weight * per_example).sum() / weight.sum()
        return (weight * per_example).mean()

    def describe(self, phi: Params) -> dict:
        weight = torch.sigmoid(phi[NAME].detach())
        out: dict[str, Any] = {"weight_mean": weight.mean().item(), "below_half": int((weight < 0.5).sum())}
        if self.flipped is not None:
            detected = weight < 0.5
            found = (detected & self.flipped).sum().item()
            out["flip_detection"] = {"precision": found / max(int(detected.sum()), 1),
                                     "recall": found / max(int(self.flipped.sum()), 1)}
        return out

    def baselines(self, phi: Params) -> dict[str, tuple[Any, Params]]:
        """(problem, phi) pairs trained like the learned run, on other data: the comparisons."""
        data = self.data
        plain = TrainingRun(self.model, data, self.loss_fn, self.accuracy_fn, self.batch_size, self.phi_prefixes)
        out = {"noisy": (plain, {}),
               "clean_validation_only": (dataclasses.replace(plain, data=_trained_on(data, data.val_x, data.val_y)),
                                         {})}
        if self.flipped is not None:
            keep = ~self.flipped
            out["oracle"] = (dataclasses.replace(plain, data=_trained_on(data, data.train_x[keep],
                                                                        data.train_y[keep])), {})
        return out


def _trained_on(data: Dataset, x: torch.Tensor, y: torch.Tensor) -> Dataset:
    return data._replace(train_x=x, train_y=y)
