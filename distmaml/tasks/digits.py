"""scikit-learn's handwritten digits: 1,797 images of 8 x 8 pixels, ten classes, bundled with the
package (sklearn.datasets.load_digits: nothing is downloaded). Pixels are scaled from 0..16 to 0..1.

The split is stratified and fixed: each class's examples are ordered by a hash of their index and
`data_seed`, and the first `train` fraction of each class trains, the next `validation` fraction
validates (the outer loss), the rest tests. `noise` flips that fraction of the training labels to
another class (the validation and test labels stay clean): the hyper-cleaning set-up. With
`images: true` the inputs are [1, 8, 8] (for a CNN), else 64 features. Tasks are training runs from
random initialisations (distmaml.tasks.runs).

    task:
      family: digits
      args: {train: 0.6, validation: 0.2, noise: 0.0, images: false, data_seed: 0, holdout: 0}
"""

from __future__ import annotations

import torch

from distmaml.errors import ConfigError, DataError
from distmaml.meta.problems.training import Dataset, class_accuracy, cross_entropy
from distmaml.rng import hash_u32, seed_words
from distmaml.tasks.runs import TrainingRuns

CLASSES = 10
_LANE_SPLIT = 31


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """(images [1797, 64] in [0, 1], labels [1797]), float64 and int64."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("task.family = 'digits' needs scikit-learn: pip install -e \".[data]\" (or pip install "
                        "scikit-learn)") from None
    digits = load_digits()
    return torch.as_tensor(digits.data, dtype=torch.float64) / 16.0, torch.as_tensor(digits.target, dtype=torch.int64)


def stratified_split(labels: torch.Tensor, train: float, validation: float,
                     data_seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Indices of the train, validation and test examples: the same fractions of every class."""
    parts: tuple[list, list, list] = ([], [], [])
    for label in range(int(labels.max()) + 1):
        members = (labels == label).nonzero().flatten()
        order = members[hash_u32(*seed_words(data_seed), _LANE_SPLIT, members).argsort()]
        first, second = round(train * len(order)), round((train + validation) * len(order))
        for part, chunk in zip(parts, (order[:first], order[first:second], order[second:])):
            part.append(chunk)
    return tuple(torch.cat(part).sort().values for part in parts)


class DigitsRuns(TrainingRuns):
    """Training runs on scikit-learn's digits (task.family: digits)."""

    @classmethod
    def from_config(cls, config, device, dtype=torch.float32, train: float = 0.6, validation: float = 0.2,
                    noise: float = 0.0, images: bool = False, data_seed: int = 0, holdout: int = 0) -> "DigitsRuns":
        """The family a config describes; its settings are task.args."""
        if not (0 < train < 1 and 0 < validation < 1 and train + validation < 1):
            raise ConfigError(f"task.args.train = {train!r}, task.args.validation = {validation!r}: each must be in "
                              "(0, 1), leaving test examples (train + validation < 1)")
        x, y = load_digits_tensors()
        if images:
            x = x.reshape(-1, 1, 8, 8)
        parts = stratified_split(y, train, validation, data_seed)
        data = Dataset(*(t for index in parts for t in (x[index].to(device, dtype), y[index].to(device))))
        family = cls(data, cross_entropy, class_accuracy, num_outputs=CLASSES, seed=config.train.seed)
        return family.with_label_noise(noise, data_seed).with_holdout(holdout)
