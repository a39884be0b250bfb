"""Problems whose task is a training run: fresh weights, mini-batches of a data set, a validation loss.

Hyperparameter learning and learned data measure phi by what it does to a network trained from
scratch: a task is one training run, keyed by one integer (its `seed`), from which the run's
initial weights (distmaml.meta.init) and the indices of each step's mini-batch are drawn
counter-based. The data set is part of the problem (constant tensors); a batch of tasks is a batch
of random initialisations and mini-batch orders, vmapped, sharded and all-reduced like MAML's tasks.

    start(phi, task)               fresh weights from task["seed"]
    inner_loss(w, phi, task, k)    the loss on step k's mini-batch (subclasses add what phi changes)
    outer_loss(w, phi, task)       the loss on the validation split (never the test split)
                                   (or outer_fn's, e.g. soft_error = 1 - mean p(label), for accuracy)
    metrics(w, phi, task)          validation and test loss and accuracy, for logs and evaluation
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from distmaml.meta.functional import LossFn, Params, detached, functional_forward
from distmaml.meta.init import fresh_weights, init_bounds
from distmaml.errors import SettingError
from distmaml.rng import hash_u32

LANE_BATCH = 11  # mini-batch draws of a task's key


class Dataset(NamedTuple):
    """A data set's three splits: inputs [n, *features] and targets [n] (classes) or [n, ...] (values)."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    val_x: torch.Tensor
    val_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    def to(self, device: torch.device | str) -> "Dataset":
        return Dataset(*(t.to(device) for t in self))


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of class logits [n, classes] against labels [n] (int64)."""
    return F.cross_entropy(logits, labels)


def class_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == labels).to(logits.dtype).mean()


def soft_error(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The expected error of a prediction drawn from the softmax: 1 - mean p(label | x). A smooth stand-in
    for the error rate that, unlike cross-entropy, an overconfident wrong prediction cannot dominate: an
    outer loss for hyperparameters chosen for accuracy (a large learning rate can raise the validation
    cross-entropy while it lowers the error)."""
    return 1 - torch.exp(-F.cross_entropy(logits, labels, reduction="none")).mean()


def binary_cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logistic loss of one logit per example [n, 1] against labels in {0, 1} [n]."""
    return F.binary_cross_entropy_with_logits(logits.squeeze(-1), labels.to(logits.dtype))


def binary_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return ((logits.squeeze(-1) > 0).to(labels.dtype) == labels).to(logits.dtype).mean()


@dataclass(frozen=True, eq=False)
class TrainingRun:
    """A training run from scratch whose meta-parameters are the inner rule's (a learned learning
    rate or schedule), and the model's parameters named by `phi_prefixes` (a learned activation
    function): those are read from phi, never trained by the inner loop. Subclasses add more phi
    and what it changes (a weight decay, per-example weights, synthetic data).

    batch_size = 0 trains on the whole training split at every step (deterministic gradient
    descent); otherwise each step draws `batch_size` examples with replacement, counter-based.
    """

    model: nn.Module
    data: Dataset
    loss_fn: LossFn = cross_entropy
    accuracy_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = class_accuracy
    batch_size: int = 0
    phi_prefixes: tuple[str, ...] = ()
    outer_fn: LossFn | None = None  # the outer loss on held-out predictions; None: loss_fn
    # Online: the outer loss is the (unweighted) training loss on the run's next mini-batch, the one it
    # draws after the unroll, instead of the validation split's (Baydin et al.'s hypergradient descent).
    outer_batch: bool = False

    outer_name = "validation"
    # Online (distmaml.meta.online) a run's inner loss gets its own counter as a tensor step: the
    # counter-based mini-batch draw takes it as it takes an int.
    modes = ("episodic", "online")

    def __post_init__(self) -> None:
        if self.batch_size < 0:
            raise SettingError("training_run.batch_size", self.batch_size, "must be >= 0 (0: the whole training split "
                               "at every step)")
        weights = detached(dict(self.model.named_parameters()))
        shared = tuple(name for name in weights if self.phi_prefixes and name.startswith(tuple(self.phi_prefixes)))
        template = {name: value for name, value in weights.items() if name not in shared}
        object.__setattr__(self, "shared", shared)
        object.__setattr__(self, "template", template)
        object.__setattr__(self, "bounds", init_bounds(template))

    def meta_parameters(self) -> Params:
        weights = dict(self.model.named_parameters())
        return {name: weights[name].detach().clone() for name in self.shared}

    def inner_template(self) -> Params:
        return self.template

    def describe(self, phi: Params) -> dict:
        return {name: phi[name].detach().tolist() for name in self.shared}

    def drawing(self, phi: Params, low: float = -4.0, high: float = 4.0) -> tuple[str, dict] | None:
        """What `distmaml plot` draws of phi: the learned elementwise function the model's parameters
        under `phi_prefixes` make (a learned activation), on [low, high]; None without one."""
        if len(self.phi_prefixes) != 1:
            return None
        prefix = self.phi_prefixes[0]
        module = self.model.get_submodule(prefix.rstrip("."))
        weights = {name[len(prefix):]: phi[name].detach() for name in self.shared}
        x = torch.linspace(low, high, 400, dtype=next(iter(weights.values())).dtype)
        with torch.no_grad():
            learned = torch.func.functional_call(module, weights, (x,))
        return "function", {"x": x, "learned": learned}

    def start(self, phi: Params, task: Any) -> Params:
        return fresh_weights(self.template, task["seed"], self.bounds)

    def predict(self, weights: Params, phi: Params, x: torch.Tensor) -> torch.Tensor:
        return functional_forward(self.model, {**{name: phi[name] for name in self.shared}, **weights}, x)

    def batch_index(self, task: Any, step: int, lane: int = LANE_BATCH) -> torch.Tensor | None:
        """The indices of step `step`'s training examples for one task (a pure function of its key
        and the step), or None for the whole training split (batch_size = 0)."""
        if not self.batch_size:
            return None
        draws = hash_u32(task["seed"], lane, step, torch.arange(self.batch_size, device=self.data.train_x.device))
        return draws % self.data.train_x.shape[0]

    def batch(self, task: Any, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Step `step`'s training examples of one task."""
        index = self.batch_index(task, step)
        if index is None:
            return self.data.train_x, self.data.train_y
        return self.data.train_x[index], self.data.train_y[index]

    def training_loss(self, weights: Params, phi: Params, task: Any, step: int) -> torch.Tensor:
        x, y = self.batch(task, step)
        return self.loss_fn(self.predict(weights, phi, x), y)

    def inner_loss(self, weights: Params, phi: Params, task: Any, step: int) -> torch.Tensor:
        return self.training_loss(weights, phi, task, step)

    def held_out_loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (self.outer_fn or self.loss_fn)(prediction, target)

    def outer_loss(self, weights: Params, phi: Params, task: Any) -> torch.Tensor:
        return self.held_out_loss(self.predict(weights, phi, self.data.val_x), self.data.val_y)

    def outer_loss_at(self, weights: Params, phi: Params, task: Any, step) -> torch.Tensor:
        """The outer loss of a persistent run whose next step is `step` (distmaml.meta.online)."""
        return self.training_loss(weights, phi, task, step) if self.outer_batch else self.outer_loss(weights, phi, task)

    def metrics(self, weights: Params, phi: Params, task: Any) -> dict[str, torch.Tensor]:
        out = {}
        for split, x, y in (("", self.data.val_x, self.data.val_y), ("test_", self.data.test_x, self.data.test_y)):
            prediction = self.predict(weights, phi, x)
            out[split + "loss"] = self.loss_fn(prediction, y)
            if self.outer_fn is not None and not split:  # what phi is chosen by, where it is not the loss
                out["outer_loss"] = self.outer_fn(prediction, y)
            if self.accuracy_fn is not None:
                out[split + "accuracy"] = self.accuracy_fn(prediction, y)
        return out

    def to(self, device: torch.device | str) -> "TrainingRun":
        return dataclasses.replace(self, model=copy.deepcopy(self.model).to(device), data=self.data.to(device))
