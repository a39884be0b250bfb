"""MNIST-1D (Greydanus and Kobak, ICML 2024): 4,000 training and 1,000 test sequences of length 40,
ten classes, generated locally from the `mnist1d` package's templates (make_dataset with its
default arguments, seed 42) -- nothing is downloaded (the package's get_dataset would download:
it is never called). Published test accuracies: logistic regression 32 %, MLP 68 %, CNN 94 %.

A validation split is carved from the end of the training split (task.args.validation examples):
outer losses are measured there, and the test split is kept for the final report. The generated
arrays are cached once under the user's cache folder (data.cache_dir), checked by a checksum.
Tasks are training runs from random initialisations (distmaml.tasks.runs).

    task:
      family: mnist1d
      args: {validation: 500, train: 0, noise: 0.0, holdout: 0}
                                  # train > 0: only the first `train` training examples; noise: the fraction
                                  # of their labels flipped; holdout: validation examples kept
                                  # apart, read by no loss (a split to early-stop on)
"""

from __future__ import annotations

import numpy as np
import torch

from distmaml.errors import ConfigError, DataError
from distmaml.meta.problems.training import Dataset, class_accuracy, cross_entropy
from distmaml.tasks.array_cache import load_or_build
from distmaml.tasks.runs import TrainingRuns

LENGTH, CLASSES, TRAIN, TEST = 40, 10, 4000, 1000


def _generate() -> tuple[np.ndarray, dict]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError:
        raise DataError("task.family = 'mnist1d' needs the mnist1d package: pip install -e \".[data]\" "
                        "(or pip install mnist1d)") from None
    data = make_dataset(get_dataset_args())  # the paper's arguments, seed 42: generated, never downloaded
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float64)
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.float64)
    if x.shape != (TRAIN + TEST, LENGTH):
        raise DataError(f"the mnist1d package generated {x.shape[0]} sequences of length {x.shape[1]}, not the "
                        f"paper's {TRAIN} + {TEST} of length {LENGTH}: an incompatible version of mnist1d")
    return np.concatenate([x, y[:, None]], axis=1), {"train": TRAIN, "test": TEST, "length": LENGTH}


def load_mnist1d(cache_dir=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train inputs [4000, 40], train labels [4000], test inputs [1000, 40], test labels [1000]), float64/int64."""
    array, _ = load_or_build(cache_dir, "mnist1d-v1", _generate)
    x = torch.from_numpy(array[:, :LENGTH].copy())
    y = torch.from_numpy(array[:, LENGTH].copy()).long()
    return x[:TRAIN], y[:TRAIN], x[TRAIN:], y[TRAIN:]


class MNIST1DRuns(TrainingRuns):
    """Training runs on MNIST-1D (task.family: mnist1d)."""

    @classmethod
    def from_config(cls, config, device, dtype=torch.float32, validation: int = 500, train: int = 0,
                    noise: float = 0.0, data_seed: int = 0, holdout: int = 0) -> "MNIST1DRuns":
        """The family a config describes; its settings are task.args."""
        if not isinstance(validation, int) or not 1 <= validation < TRAIN:
            raise ConfigError(f"task.args.validation = {validation!r}: must be an integer between 1 and {TRAIN - 1}")
        if not isinstance(train, int) or not 0 <= train <= TRAIN - validation:
            raise ConfigError(f"task.args.train = {train!r}: must be 0 (all) or at most {TRAIN - validation} "
                              f"(the training split less task.args.validation)")
        x, y, test_x, test_y = load_mnist1d(config.data.cache_dir)
        split = TRAIN - validation
        train_x, train_y = x[:split], y[:split]
        if train:
            train_x, train_y = train_x[:train], train_y[:train]
        data = Dataset(train_x, train_y, x[split:], y[split:], test_x, test_y)
        data = Dataset(*(t.to(device, dtype) if t.is_floating_point() else t.to(device) for t in data))
        family = cls(data, cross_entropy, class_accuracy, num_outputs=CLASSES, seed=config.train.seed)
        return family.with_label_noise(noise, data_seed).with_holdout(holdout)
