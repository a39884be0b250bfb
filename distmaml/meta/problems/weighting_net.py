"""Meta-Weight-Net (Shu et al. 2019): a small network that maps an example's loss to its weight.

    phi = the weighting net V: one hidden layer of `hidden` ReLU units and a sigmoid output, from an
          example's detached training loss (and, with `classes`, its one-hot label) to its weight
    inner_loss(w, phi, task, k) = sum_i V(l_i) l_i / sum_i V(l_i) over step k's mini-batch
                                  (normalised, as hyperclean's), or mean_i V(l_i(w)) * l_i(w) (Shu et
                                  al.'s mean: normalised=False, hyperclean.weighting=mean)
    outer_loss(w, phi, task)    = the loss on the clean validation split

Unlike one weight per example (distmaml.meta.problems.reweighting), phi has a fixed size whatever
the data set, and it weighs examples it has never seen: a flipped label gives a large loss, and
the net learns to weigh large losses down. Online (distmaml.meta.online) with U = 1 and SGD it is
Shu et al.'s algorithm: a lookahead step with the current net, the net's update on the validation
loss after it, then the real step with the updated net. The net starts at nn.Linear's default
initialisation, drawn from torch's global generator (the trainer seeds it with train.seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distmaml.errors import SettingError
from distmaml.meta.functional import Params
from distmaml.meta.problems.reweighting import Reweighting
from distmaml.meta.problems.training import TrainingRun

NET = "weighting_net."


@dataclass(frozen=True, eq=False)
class WeightingNet(Reweighting):
    hidden: int = 100
    classes: bool = False  # the net also reads the example's label (one-hot): a weight per class and loss

    learned_name = "weighting_net"
    headline = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (isinstance(self.hidden, int) and self.hidden >= 1):
            raise SettingError("weighting_net.hidden", self.hidden, "must be an integer >= 1")
        train = self.data.train_x
        inputs = 1 + (self._num_classes() if self.classes else 0)
        first, second = nn.Linear(inputs, self.hidden), nn.Linear(self.hidden, 1)
        net = {f"{NET}0.weight": first.weight, f"{NET}0.bias": first.bias,
               f"{NET}2.weight": second.weight, f"{NET}2.bias": second.bias}
        object.__setattr__(self, "initial_net", {name: value.detach().to(train.device, train.dtype)
                                                 for name, value in net.items()})

    def _check_initial_weights(self) -> None:
        pass  # the net's sigmoid output starts near 1/2, never near 0

    def _num_classes(self) -> int:
        """The number of classes: the model's last bias."""
        return int([value for name, value in self.template.items() if name.endswith("bias")][-1].shape[0])

    def meta_parameters(self) -> Params:
        return {**TrainingRun.meta_parameters(self), **{name: value.clone() for name, value in self.initial_net.items()}}

    def example_weights(self, phi: Params, losses: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """V(loss_i [, label_i]) for every example: the net reads the losses as constants."""
        inputs = losses.detach().unsqueeze(-1)
        if self.classes:
            inputs = torch.cat([inputs, F.one_hot(labels, self._num_classes()).to(inputs.dtype)], -1)
        hidden = torch.relu(F.linear(inputs, phi[f"{NET}0.weight"], phi[f"{NET}0.bias"]))
        return torch.sigmoid(F.linear(hidden, phi[f"{NET}2.weight"], phi[f"{NET}2.bias"])).squeeze(-1)

    def inner_loss(self, weights: Params, phi: Params, task: Any, step) -> torch.Tensor:
        x, y = self.batch(task, step)
        per_example = F.cross_entropy(self.predict(weights, phi, x), y, reduction="none")
        weight = self.example_weights(phi, per_example, y)
        if self.normalised:
            return (weight * per_example).sum() / weight.sum()
        return (weight * per_example).mean()

    def describe(self, phi: Params) -> dict:
        """The weight the net gives an example (of class 0, with `classes`) at a few losses."""
        losses = torch.tensor([0.01, 0.1, 0.5, 1.0, 2.0, 5.0], dtype=self.data.train_x.dtype,
                              device=self.data.train_x.device)
        labels = torch.zeros(len(losses), dtype=torch.int64, device=losses.device)
        with torch.no_grad():
            weights = self.example_weights(phi, losses, labels)
        return {"weight_at_loss": {f"{loss:g}": weight for loss, weight in zip(losses.tolist(), weights.tolist())}}

    def drawing(self, phi: Params, low: float = 0.0, high: float = 5.0) -> tuple[str, dict] | None:
        """The learned loss-to-weight function (class 0, with `classes`), on [low, high]."""
        losses = torch.linspace(low, high, 200, dtype=self.data.train_x.dtype, device=self.data.train_x.device)
        with torch.no_grad():
            weights = self.example_weights(phi, losses, torch.zeros(200, dtype=torch.int64, device=losses.device))
        return "function", {"x": losses, "learned": weights}

