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

from distmaml.meta.problems.training import Dataset
from distmaml.rng import hash_u32, seed_words


@dataclass(frozen=True)
class TrainingRuns:
    dataset: Dataset
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    accuracy_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    num_outputs: int
    seed: int = 0
    is_classification: bool = True

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
        return dataclasses.replace(self, dataset=self.dataset.to(device))
