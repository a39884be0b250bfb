"""Task families whose task is a training run on a fixed data set (hyperparameter and data learning).

A task is one integer key, hash(seed, stream, iteration, global index): the problem draws the
run's initial weights and its mini-batches from it (distmaml.meta.problems.training), so a batch
of tasks is a batch of random initialisations, world-size invariant like every family. The data set
(train / validation / test splits) is held once, on the training device.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch

from distmaml.errors import ConfigError
from distmaml.meta.problems.training import Dataset
from distmaml.rng import hash_u32, seed_words


LANE_PICK, LANE_CLASS = 21, 22  # label-noise draws of the data seed
LANE_HOLDOUT = 23  # which validation examples a holdout takes


def flip_labels(labels: torch.Tensor, fraction: float, classes: int, data_seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy labels, flipped mask): exactly round(fraction * n) examples, chosen counter-based from
    `data_seed`, get a label drawn uniformly from the other classes; the rest keep theirs."""
    n = labels.shape[0]
    index = torch.arange(n, device=labels.device)
    order = hash_u32(*seed_words(data_seed), LANE_PICK, index, device=labels.device).argsort()
    flipped = torch.zeros(n, dtype=torch.bool, device=labels.device)
    flipped[order[:round(fraction * n)]] = True
    shift = 1 + hash_u32(*seed_words(data_seed), LANE_CLASS, index, device=labels.device) % (classes - 1)
    return torch.where(flipped, (labels + shift) % classes, labels), flipped


@dataclass(frozen=True)
class TrainingRuns:
    dataset: Dataset
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    accuracy_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    num_outputs: int
    seed: int = 0
    is_classification: bool = True
    flipped: torch.Tensor | None = None  # which training labels were flipped (label-noise studies), else None
    # (inputs, labels) carved from the validation split that no loss reads: where a study early-stops a
    # run whose outer loss reads the validation split (with_holdout), else None.
    holdout: tuple[torch.Tensor, torch.Tensor] | None = None

    # A task trains on the whole fixed training split: no shots, no query set to size (TaskFamily.episodic).
    episodic = False

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(prediction, target)

    def accuracy(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.accuracy_fn(prediction, target)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.dataset.train_x.shape[1:])

    @property
    def support(self) -> int:  # the protocol's "examples a task trains on"
        return self.dataset.train_x.shape[0]

    @property
    def query(self) -> int:
        return self.dataset.val_x.shape[0]

    def sample(self, stream: int, iteration: int | torch.Tensor, indices: torch.Tensor, support: int | None = None,
               query: int | None = None) -> dict[str, torch.Tensor]:
        """Tasks `indices` of iteration `iteration` in `stream`: {"seed": [n] int64 keys}."""
        device = self.dataset.train_x.device
        index = torch.as_tensor(indices, dtype=torch.int64, device=device)
        return {"seed": hash_u32(*seed_words(self.seed), stream, iteration, index, device=device)}

    def with_seed(self, seed: int) -> "TrainingRuns":
        return dataclasses.replace(self, seed=seed)

    def to(self, device: torch.device | str) -> "TrainingRuns":
        flipped = None if self.flipped is None else self.flipped.to(device)
        holdout = None if self.holdout is None else tuple(part.to(device) for part in self.holdout)
        return dataclasses.replace(self, dataset=self.dataset.to(device), flipped=flipped, holdout=holdout)

    def with_holdout(self, count: int) -> "TrainingRuns":
        """The same family with `count` validation examples, chosen by a fixed hash of their position (a
        split ordered by class loses no class), moved out of the validation split into `holdout`, which
        no loss reads: a split to early-stop on that the outer loss never saw."""
        val_x, val_y = self.dataset.val_x, self.dataset.val_y
        if not isinstance(count, int) or not 0 <= count < val_x.shape[0]:
            raise ConfigError(f"task.args.holdout = {count!r}: must be an integer between 0 and "
                              f"{val_x.shape[0] - 1} (fewer than the validation split's {val_x.shape[0]} examples)")
        if not count:
            return self
        order = hash_u32(LANE_HOLDOUT, torch.arange(val_x.shape[0], device=val_x.device)).argsort()
        held, kept = order[:count].sort().values, order[count:].sort().values
        return dataclasses.replace(self, dataset=self.dataset._replace(val_x=val_x[kept], val_y=val_y[kept]),
                                   holdout=(val_x[held], val_y[held]))

    def with_label_noise(self, fraction: float, data_seed: int = 0) -> "TrainingRuns":
        """The same family with a fraction of its training labels flipped (validation and test stay clean)."""
        if not 0 <= fraction < 1:
            raise ConfigError(f"task.args.noise = {fraction!r}: must be in [0, 1) (the fraction of training labels "
                              "flipped)")
        if not fraction:
            return self
        noisy, flipped = flip_labels(self.dataset.train_y, fraction, self.num_outputs, data_seed)
        return dataclasses.replace(self, dataset=self.dataset._replace(train_y=noisy), flipped=flipped)
