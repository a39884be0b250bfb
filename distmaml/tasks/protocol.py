"""What distmaml needs of a family of tasks, and a check a user can run on their own family.

    from distmaml.tasks import check_family
    check_family(MyTasks(seed=0))          # raises FamilyError naming what is wrong; returns None if all is well

A family that follows this protocol gets world-size invariance for free: when `sample` is a pure
function of (the family's seed, stream, iteration, each global task index), any process can build
any shard of a meta-batch, so one process and N processes compute the same meta-gradient up to
the order of float sums. `check_family` samples twice, and sharded against whole, to test exactly that.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

from distmaml.errors import ConfigError
from distmaml.meta.functional import TaskBatch
from distmaml.rng import STREAM_EVAL, STREAM_TRAIN


@runtime_checkable
class TaskFamily(Protocol):
    """A family of tasks (sine regression, N-way image classification, your own).

    Attributes: `seed`; `support` and `query`, the default number of examples per task (per class
    for classification); `is_classification`; `input_shape`, one example's input (e.g. (1,) or
    (3, 84, 84)); `num_outputs`, what the model must output per example (1 target, or N classes).
    The model is sized from `input_shape` and `num_outputs`, so any model fits any family whose
    shapes it accepts.
    """

    seed: int
    support: int
    query: int
    is_classification: bool
    input_shape: tuple[int, ...]
    num_outputs: int

    @classmethod
    def from_config(cls, config: Any, device: torch.device | str, dtype: torch.dtype, **args: Any) -> "TaskFamily":
        """The family a run's config describes; `args` is the config's task.args."""

    def sample(self, stream: int, iteration: int | torch.Tensor, indices: torch.Tensor, support: int | None = None,
               query: int | None = None) -> TaskBatch:
        """Tasks `indices` (int64 global task indices) of meta-iteration `iteration` in `stream`
        (STREAM_TRAIN, STREAM_EVAL, ...), task dimension first; `iteration` may be a device tensor."""

    def loss(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One task's loss, a scalar (it is vmapped over tasks)."""

    def accuracy(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """One task's accuracy (classification families)."""

    def with_seed(self, seed: int) -> "TaskFamily":
        """The same family drawing from another seed (evaluation uses eval.seed)."""

    def to(self, device: torch.device | str) -> "TaskFamily":
        """The same family sampling on `device` ("meta": shapes only, for the memory estimate)."""


METHODS = ("from_config", "sample", "loss", "with_seed", "to")
REQUIRED = ("seed", "support", "query", "is_classification", "input_shape", "num_outputs", *METHODS)


class FamilyError(ConfigError):
    """A task family that does not do what the protocol asks, in one line."""


def missing_members(family: Any) -> list[str]:
    """The members of TaskFamily that `family` lacks: all of them for an instance; for a class, its
    methods (attributes such as `seed` may be set by __init__)."""
    required = METHODS if isinstance(family, type) else REQUIRED
    if getattr(family, "is_classification", False):
        required = (*required, "accuracy")
    return [name for name in required if not hasattr(family, name)]


def check_family(family: Any, tasks: int = 6, where: str = "task family") -> None:
    """Raise FamilyError unless `family` follows the protocol and its tasks are a pure function of
    (seed, stream, iteration, global index): sampled twice alike, and a shard equal to the slice."""
    name = type(family).__name__
    if missing := missing_members(family):
        raise FamilyError(f"{where} {name} lacks {', '.join(missing)} (see distmaml.tasks.TaskFamily)")
    indices = torch.arange(tasks)
    whole = family.sample(STREAM_TRAIN, 3, indices)
    if not isinstance(whole, TaskBatch):
        raise FamilyError(f"{where} {name}: sample() must return a TaskBatch, got {type(whole).__name__}")
    for part, value in zip(TaskBatch._fields, whole):
        if not torch.is_tensor(value) or value.shape[0] != tasks:
            raise FamilyError(f"{where} {name}: sample(...).{part} must be a tensor with the {tasks} tasks first")
    if tuple(whole.support_x.shape[2:]) != tuple(family.input_shape):
        raise FamilyError(f"{where} {name}: inputs are {tuple(whole.support_x.shape[2:])} per example, but "
                          f"input_shape says {tuple(family.input_shape)}")
    again = family.sample(STREAM_TRAIN, 3, indices)
    if not _same(whole, again):
        raise FamilyError(f"{where} {name}: two calls of sample() with the same (stream, iteration, indices) gave "
                          "different tasks; draw from (seed, stream, iteration, index), not from a random generator")
    split = tasks // 2
    shards = [family.sample(STREAM_TRAIN, 3, indices[:split]), family.sample(STREAM_TRAIN, 3, indices[split:])]
    joined = TaskBatch(*(torch.cat(parts) for parts in zip(*shards)))
    if not _same(whole, joined):
        raise FamilyError(f"{where} {name}: tasks {split}..{tasks - 1} sampled on their own differ from the same "
                          "tasks sampled with the others; a task must depend on its own global index only")
    if _same(whole, family.sample(STREAM_EVAL, 3, indices)):
        raise FamilyError(f"{where} {name}: the evaluation stream gives the training tasks; keep streams apart")
    loss = family.loss(whole.query_x.new_zeros(whole.query_y.shape + (family.num_outputs,)
                                                if family.is_classification else whole.query_y.shape)[0],
                       whole.query_y[0])
    if not (torch.is_tensor(loss) and loss.dim() == 0):
        raise FamilyError(f"{where} {name}: loss(prediction, target) of one task must be a scalar tensor")


def _same(a: TaskBatch, b: TaskBatch) -> bool:
    return all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, b))
