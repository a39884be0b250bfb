"""MAML and its family as one problem: phi is the initial weights, a task a support and a query set.

    start(phi, task)          = phi's weights (the ones the inner loop adapts)
    inner_loss(w, phi, task)  = L(model(w, support_x), support_y) [+ lam/2 ||w - phi||^2]
    outer_loss(w, phi, task)  = L(model(w, query_x), query_y)

- Meta-SGD, LSLR and the other rules: the inner rule's learned step sizes are entries of phi.
- ANIL (`adapt`: name prefixes of the weights the inner loop adapts): the other weights keep phi's
  values in every inner step and are meta-trained through both losses.
- iMAML (`proximal` = lam > 0): the inner problem is pulled towards phi, so its solution depends on
  phi and implicit differentiation applies; with any unrolled method it is "unrolled iMAML".
- MAML++'s multi-step loss is the unrolled method's weighting of the outer loss along the trajectory.
- Reptile is a method (theta - phi_K), possible because this problem starts the inner loop at phi.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from distmaml.meta.functional import LossFn, Params, TaskBatch, functional_forward, mse
from distmaml.errors import SettingError


@dataclass(frozen=True, eq=False)
class MAML:
    """Few-shot learning of initial weights: the problem of MAML (Finn et al. 2017) and its family."""

    model: nn.Module
    loss_fn: LossFn = mse
    adapt: tuple[str, ...] = ()
    proximal: float = 0.0
    accuracy_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    outer_name = "query"  # what logs call the outer loss's data
    # Why an implicit method refuses this problem when the inner loss does not read phi.
    implicit_hint = "set maml.proximal > 0 (iMAML's lam)"

    def __post_init__(self) -> None:
        names = [name for name, _ in self.model.named_parameters()]
        prefixes = tuple(self.adapt)
        if unmatched := [p for p in prefixes if not any(name.startswith(p) for name in names)]:
            raise SettingError("inner.adapt", list(prefixes), f"no weight of the model starts with "
                               f"{', '.join(map(repr, unmatched))} (its weights: {', '.join(names)})")
        if not self.proximal >= 0:
            raise SettingError("maml.proximal", self.proximal, "must be >= 0")
        adapted = tuple(name for name in names if not prefixes or name.startswith(prefixes))
        object.__setattr__(self, "adapt", prefixes)
        object.__setattr__(self, "adapted", adapted)
        object.__setattr__(self, "fixed", tuple(name for name in names if name not in adapted))

    def meta_parameters(self) -> Params:
        return dict(self.model.named_parameters())

    def inner_template(self) -> Params:
        weights = dict(self.model.named_parameters())
        return {name: weights[name] for name in self.adapted}

    def start(self, phi: Params, task: Any) -> Params:
        return {name: phi[name] for name in self.adapted}

    def predict(self, weights: Params, phi: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_forward(self.model, {**{name: phi[name] for name in self.fixed}, **weights}, x)

    def inner_loss(self, weights: Params, phi: Params, task: TaskBatch, step: int) -> torch.Tensor:
        loss = self.loss_fn(self.predict(weights, phi, task.support_x), task.support_y)
        if self.proximal:
            pull = sum(((weights[name] - phi[name]) ** 2).sum() for name in self.adapted)
            loss = loss + 0.5 * self.proximal * pull
        return loss

    def outer_loss(self, weights: Params, phi: Params, task: TaskBatch) -> torch.Tensor:
        return self.loss_fn(self.predict(weights, phi, task.query_x), task.query_y)

    def metrics(self, weights: Params, phi: Params, task: TaskBatch) -> dict[str, torch.Tensor]:
        prediction = self.predict(weights, phi, task.query_x)
        out = {"loss": self.loss_fn(prediction, task.query_y)}
        if self.accuracy_fn is not None:
            out["accuracy"] = self.accuracy_fn(prediction, task.query_y)
        # Beside the query loss, the support loss shows over-fitting of the support set.
        out["support_loss"] = self.loss_fn(self.predict(weights, phi, task.support_x), task.support_y)
        return out

    def check_task(self, phi: Params, task: Any) -> str | None:
        """What is wrong with one task for this problem, or None: it must be a TaskBatch-like set of
        support and query examples, whose targets the model's outputs match exactly (a loss would
        broadcast [k, 1] outputs against [k] targets to [k, k], and train on a meaningless number)."""
        if not all(torch.is_tensor(getattr(task, name, None)) for name in TaskBatch._fields):
            return (f"needs tasks with {', '.join(TaskBatch._fields)} (a distmaml.meta.TaskBatch); the task family "
                    f"gives a {type(task).__name__}")
        weights = self.start(phi, task)
        for split in ("support", "query"):
            x, y = getattr(task, f"{split}_x"), getattr(task, f"{split}_y")
            out = self.predict(weights, phi, x)
            fits = out.shape == y.shape if y.is_floating_point() else out.shape[:-1] == y.shape
            if not fits:
                expected = "the same shape" if y.is_floating_point() else "that shape and one score per class"
                return (f"the model's outputs for {split}_x are {tuple(out.shape)} per task but {split}_y is "
                        f"{tuple(y.shape)}: they must have {expected}, or the loss broadcasts them")
        return None

    def to(self, device: torch.device | str) -> "MAML":
        return dataclasses.replace(self, model=copy.deepcopy(self.model).to(device))
