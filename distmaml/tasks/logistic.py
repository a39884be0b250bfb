"""A small synthetic logistic regression whose data the config generates: the bi-level test bed.

`samples` examples of `features` standard normal inputs; the labels are drawn from a logistic model
whose weights are +-`signal` on the first `informative` features and 0 on the rest, so a learned
per-feature decay has something to find (large decays on the uninformative features). The split is
`train` / the rest for validation, plus `test` further examples for the final report. Everything is
drawn counter-based from `data_seed`: the same data on every machine and process.

Tasks are training runs from random initialisations (distmaml.tasks.runs); with training_run.batch_size
= 0 the inner problem is deterministic full-batch logistic regression, strongly convex with any
positive decay, so its solution is unique and its Hessian small enough to form: exact implicit
hypergradients can be checked against a dense solve (`distmaml gradcheck`).
"""

from __future__ import annotations

import math

import torch

from distmaml.errors import ConfigError
from distmaml.meta.problems.training import Dataset, binary_accuracy, binary_cross_entropy
from distmaml.rng import uniform
from distmaml.tasks.runs import TrainingRuns

_LANE_X, _LANE_LABEL, _LANE_SIGN = range(3)


def _normal(seed: int, lane: int, *shape: int, dtype=torch.float64) -> torch.Tensor:
    """Standard normal draws by Box-Muller from two counter-based uniforms."""
    index = torch.arange(math.prod(shape), dtype=torch.int64)
    u1 = uniform(0.0, 1.0, seed, lane, 0, index, dtype=dtype)
    u2 = uniform(0.0, 1.0, seed, lane, 1, index, dtype=dtype)
    radius = torch.sqrt(-2.0 * torch.log1p(-u1))  # 1 - u1 in (0, 1]: no log(0)
    return (radius * torch.cos(2 * math.pi * u2)).reshape(shape)


def logistic_data(samples: int = 200, features: int = 20, informative: int = 5, train: int = 100, test: int = 1000,
                  signal: float = 1.5, data_seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs [samples + test, features], labels [samples + test] in {0, 1}), float64."""
    total = samples + test
    x = _normal(data_seed, _LANE_X, total, features)
    signs = torch.where(uniform(0.0, 1.0, data_seed, _LANE_SIGN, torch.arange(informative)) < 0.5, -1.0, 1.0)
    weights = torch.zeros(features, dtype=torch.float64)
    weights[:informative] = signal * signs.double()
    probability = torch.sigmoid(x @ weights)
    labels = (uniform(0.0, 1.0, data_seed, _LANE_LABEL, torch.arange(total), dtype=torch.float64) < probability)
    return x, labels.long()


class LogisticRuns(TrainingRuns):
    """Training runs of a logistic regression on `logistic_data` (task.family: logistic)."""

    @classmethod
    def from_config(cls, config, device, dtype=torch.float32, samples: int = 200, features: int = 20,
                    informative: int = 5, train: int = 100, test: int = 1000, signal: float = 1.5,
                    data_seed: int = 0) -> "LogisticRuns":
        """The family a config describes; its settings are task.args."""
        return logistic_runs(config.train.seed, device, dtype, samples, features, informative, train, test, signal,
                             data_seed)


def logistic_runs(seed: int, device, dtype=torch.float32, samples: int = 200, features: int = 20,
                  informative: int = 5, train: int = 100, test: int = 1000, signal: float = 1.5,
                  data_seed: int = 0) -> LogisticRuns:
    for key, value, low in (("samples", samples, 2), ("features", features, 1), ("train", train, 1),
                            ("test", test, 1), ("informative", informative, 0)):
        if not isinstance(value, int) or value < low:
            raise ConfigError(f"task.args.{key} = {value!r}: must be an integer >= {low}")
    if train >= samples:
        raise ConfigError(f"task.args.train = {train}: must leave validation examples out of task.args.samples "
                          f"({samples})")
    if informative > features:
        raise ConfigError(f"task.args.informative = {informative}: must be <= task.args.features ({features})")
    x, y = logistic_data(samples, features, informative, train, test, signal, data_seed)
    x = x.to(device, dtype)
    y = y.to(device)
    data = Dataset(x[:train], y[:train], x[train:samples], y[train:samples], x[samples:], y[samples:])
    return LogisticRuns(data, binary_cross_entropy, binary_accuracy, num_outputs=1, seed=seed)
