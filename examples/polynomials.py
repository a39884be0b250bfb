"""A task family and a model of your own, outside the distmaml package: regression of random cubics.

Each task is a polynomial y = c0 + c1 x + c2 x^2 + c3 x^3 (degree set by task.args.degree) with
coefficients drawn uniformly from [-1, 1], seen at points x in [-2, 2]. Train it with

    distmaml train examples/polynomials.yaml              # from the repository's root

The config names this file's objects by import path (task.family: examples.polynomials:PolynomialTasks,
model.kind: examples.polynomials:build_model) and passes its task.args / model.args sections to
them as keyword arguments. Nothing in distmaml is edited.

World-size invariance comes for free from the protocol (distmaml.tasks.TaskFamily): every number
of a task is a hash of (seed, stream, iteration, global task index, ...) -- distmaml.rng's
`uniform` -- never a draw from a random generator's state, so any process can build any shard of
a meta-batch, and 1 and N processes compute the same meta-gradient. `check_family` tests exactly
that: run it on your own family before you train with it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from distmaml.meta import TaskBatch, mse
from distmaml.rng import seed_words, uniform

# Each random quantity draws from its own lane: changing the number of points leaves a task's
# coefficients (and its other points) as they were.
LANE_COEFFICIENTS, LANE_SUPPORT, LANE_QUERY = range(3)


@dataclass(frozen=True)
class PolynomialTasks:
    seed: int = 0
    support: int = 10
    query: int = 10
    degree: int = 3
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32

    loss = staticmethod(mse)
    is_classification = False
    input_shape = (1,)
    num_outputs = 1

    @classmethod
    def from_config(cls, config, device, dtype=torch.float32, degree: int = 3) -> "PolynomialTasks":
        return cls(seed=config.train.seed, support=config.task.support, query=config.task.query, degree=degree,
                   device=device, dtype=dtype)

    def sample(self, stream, iteration, indices, support=None, query=None) -> TaskBatch:
        task = torch.as_tensor(indices, dtype=torch.int64, device=self.device)[:, None]
        power = torch.arange(self.degree + 1, device=self.device)
        coefficients = self._uniform(-1.0, 1.0, stream, iteration, LANE_COEFFICIENTS, task, power)  # [n, degree + 1]

        def points(lane, count):
            x = self._uniform(-2.0, 2.0, stream, iteration, lane, task, torch.arange(count, device=self.device))
            y = (coefficients[:, None, :] * x[..., None] ** power).sum(-1)
            return x[..., None], y[..., None]

        support = self.support if support is None else support
        query = self.query if query is None else query
        return TaskBatch(*points(LANE_SUPPORT, support), *points(LANE_QUERY, query))

    def with_seed(self, seed: int) -> "PolynomialTasks":
        return dataclasses.replace(self, seed=seed)

    def to(self, device) -> "PolynomialTasks":
        return dataclasses.replace(self, device=device)

    def _uniform(self, low, high, *keys):
        return uniform(low, high, *seed_words(self.seed), *keys, dtype=self.dtype, device=self.device)


class ResidualMLP(nn.Module):
    """An MLP whose hidden layers add their output to their input."""

    def __init__(self, in_features: int, out_features: int, width: int, depth: int):
        super().__init__()
        self.embed = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), nn.Linear(width, width)) for _ in range(depth))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(width, out_features))

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


def build_model(input_shape, num_outputs, width: int = 64, depth: int = 2) -> nn.Module:
    """distmaml calls this with the family's input shape and outputs, and model.args as keywords."""
    (features,) = input_shape
    return ResidualMLP(features, num_outputs, width, depth)
