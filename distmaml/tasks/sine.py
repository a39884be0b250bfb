"""Sine-wave regression, the MAML paper's protocol (Finn et al. 2017, section 5.1):
y = A sin(x - phi) with A ~ U[0.1, 5.0], phi ~ U[0, pi], x ~ U[-5, 5]."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch

from distmaml.meta.functional import TaskBatch, mse
from distmaml.rng import seed_words, uniform

# Each random quantity of a task draws from its own lane, so changing the number of support
# points at test time leaves the task's amplitude, phase and query points unchanged.
_LANE_AMPLITUDE, _LANE_PHASE, _LANE_SUPPORT, _LANE_QUERY = range(4)


@dataclass(frozen=True)
class SineTasks:
    """The family of sine tasks; `sample` builds any subset of a meta-batch by global index."""

    seed: int = 0
    support: int = 10
    query: int = 10
    amplitude: tuple[float, float] = (0.1, 5.0)
    phase: tuple[float, float] = (0.0, math.pi)
    x_range: tuple[float, float] = (-5.0, 5.0)
    device: torch.device | str = "cpu"
    dtype: torch.dtype = torch.float32

    loss = staticmethod(mse)
    is_classification = False
    episodic = True  # few-shot tasks: shots and a query set of a chosen size
    input_shape = (1,)
    num_outputs = 1

    @classmethod
    def from_config(cls, config, device, dtype=torch.float32) -> "SineTasks":
        task = config.task
        return cls(seed=config.train.seed, support=task.support, query=task.query,
                   amplitude=tuple(task.amplitude), phase=tuple(task.phase), x_range=tuple(task.x_range),
                   device=device, dtype=dtype)

    def to(self, device: torch.device | str) -> "SineTasks":
        """The same family sampling on `device` ("meta": shapes only, as the memory check needs)."""
        return dataclasses.replace(self, device=device)

    def with_seed(self, seed: int) -> "SineTasks":
        """The same family drawing its tasks from another seed (evaluation uses eval.seed)."""
        return dataclasses.replace(self, seed=seed)

    def sample(self, stream: int, iteration: int | torch.Tensor, indices: torch.Tensor,
               support: int | None = None, query: int | None = None) -> TaskBatch:
        """Tasks `indices` (global task indices, int64) of meta-iteration `iteration` in `stream`."""
        support = self.support if support is None else support
        query = self.query if query is None else query
        task, amplitude, phase = self._functions(stream, iteration, indices)

        def points(lane: int, count: int) -> tuple[torch.Tensor, torch.Tensor]:
            j = torch.arange(count, dtype=torch.int64, device=self.device)
            x = self._uniform(self.x_range, stream, iteration, lane, task, j)
            return x[..., None], (amplitude * torch.sin(x - phase))[..., None]

        return TaskBatch(*points(_LANE_SUPPORT, support), *points(_LANE_QUERY, query))

    def curve(self, stream: int, iteration: int, indices: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """The true functions of tasks `indices` on a grid `x` (for plots): [n, len(x), 1]."""
        _, amplitude, phase = self._functions(stream, iteration, indices)
        return (amplitude * torch.sin(x.to(self.device, self.dtype)[None, :] - phase))[..., None]

    def _functions(self, stream, iteration, indices):
        """Task indices as a [n, 1] key, and the tasks' amplitudes and phases, each [n, 1]."""
        task = torch.as_tensor(indices, dtype=torch.int64, device=self.device)[:, None]
        amplitude = self._uniform(self.amplitude, stream, iteration, _LANE_AMPLITUDE, task)
        phase = self._uniform(self.phase, stream, iteration, _LANE_PHASE, task)
        return task, amplitude, phase

    def _uniform(self, bounds, stream, iteration, lane, *keys):
        # The integer keys lead, so they are mixed once in Python rather than per element.
        return uniform(bounds[0], bounds[1], *seed_words(self.seed), stream, iteration, lane, *keys,
                       dtype=self.dtype, device=self.device)
