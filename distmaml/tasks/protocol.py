"""What distmaml needs of a family of tasks, and a check a user can run on their own family.

    from distmaml.tasks import check_family
    check_family(MyTasks(seed=0))          # raises FamilyError naming what is wrong; returns None if all is well

A family that follows this protocol gets world-size invariance for free: when `sample` is a pure
function of (the family's seed, stream, iteration, each global task index), any process can build
any shard of a meta-batch, so one process and N processes compute the same meta-gradient up to
the order of float sums. `check_family` samples twice, and sharded against whole, to test exactly that,
and checks what a batch holds (shapes, dtype, finite values); the trainer runs it on its first batch.
"""

from __future__ import annotations

import traceback
from typing import Any, NoReturn, Protocol, runtime_checkable

import torch
from torch.utils._pytree import tree_flatten, tree_map

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

    Optional: `episodic`, a class attribute (read before the family is built, e.g. by `distmaml
    study seeds`): True, the default for a family that does not set it, for few-shot tasks whose
    support and query sets `sample(support=, query=)` sizes (evaluation's shots and query); False
    for tasks that are training runs on the family's fixed data set (`support` is then the size of
    its training split), which have no shots: evaluation refuses a number of shots or query examples.
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
        (STREAM_TRAIN, STREAM_EVAL, ...), task dimension first; `iteration` may be a device tensor.
        Few-shot tasks are a TaskBatch (x: [n, examples, *input_shape], y: [n, examples, ...]) with
        `support` and `query` examples (per class) when given; other problems' tasks any pytree
        (a dict) of tensors, e.g. training runs' {"seed": [n]}."""

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
# A family that does not say has few-shot tasks: every family was read so before `episodic` existed.
EPISODIC_DEFAULT = True


class FamilyError(ConfigError):
    """A task family that does not do what the protocol asks, in one line."""


def is_episodic(family: Any) -> bool:
    """Whether the tasks of `family` (a family or its class) are few-shot tasks with shots and a query
    set of a chosen size: its `episodic` attribute, EPISODIC_DEFAULT where it has none."""
    value = getattr(family, "episodic", EPISODIC_DEFAULT)
    if not isinstance(value, bool):
        name = family.__name__ if isinstance(family, type) else type(family).__name__
        raise FamilyError(f"task family {name}: episodic = {value!r}; it must be True or False, set on the class "
                          "(see distmaml.tasks.TaskFamily)")
    return value


def missing_members(family: Any) -> list[str]:
    """The members of TaskFamily that `family` lacks: all of them for an instance; for a class, its
    methods (attributes such as `seed` may be set by __init__)."""
    required = METHODS if isinstance(family, type) else REQUIRED
    if getattr(family, "is_classification", False):
        required = (*required, "accuracy")
    return [name for name in required if not hasattr(family, name)]


def check_family(family: Any, tasks: int = 6, where: str = "task family", dtype: torch.dtype | None = None,
                 iteration: int = 3, device: torch.device | str = "cpu", values: bool = True) -> None:
    """Raise FamilyError unless `family` follows the protocol on `tasks` tasks of `iteration`.

    A batch is a TaskBatch or any pytree (a dict) of tensors with the tasks first, floating-point
    ones (given `dtype`) in the run's dtype and finite. Tasks are a pure function of (seed, stream,
    iteration, global index): sampled twice alike, a shard equal to the slice, the evaluation
    stream apart. For tasks with support and query sets: inputs of `input_shape`, as many targets
    as inputs, sample(support=, query=) honoured (evaluation and summaries count on it), a scalar
    loss. values=False checks shapes and types only (on the `meta` device, before a memory estimate).
    """
    name = type(family).__name__
    if missing := missing_members(family):
        raise FamilyError(f"{where} {name} lacks {', '.join(missing)} (see distmaml.tasks.TaskFamily)")
    is_episodic(family)  # a wrong `episodic` is refused here, not when an evaluation first reads it

    def fail(message: str) -> NoReturn:
        raise FamilyError(f"{where} {name}: {message}")

    def call(what: str, fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FamilyError:
            raise
        except Exception as err:  # noqa: BLE001 - the family's own code failed: one line, with where
            frame = traceback.extract_tb(err.__traceback__)[-1]
            message = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            on = "" if values else " on the meta device (shapes only, for the memory estimate; " \
                                   "engine.memory_check=false skips it)"
            fail(f"{what} failed{on}: {type(err).__name__}: {message} ({frame.filename}:{frame.lineno})")

    def sample(stream: int, indices: torch.Tensor, **counts):
        return call("sample()", family.sample, stream, iteration, indices, **counts)

    indices = torch.arange(tasks, device=device)
    whole = sample(STREAM_TRAIN, indices)
    _check_batch(whole, tasks, dtype, fail, values)
    sets = _fields(whole)
    if sets:
        _check_examples(family, whole, lambda **counts: _fields(sample(STREAM_TRAIN, indices[:1], **counts)), fail)
        query_x, query_y = sets["query_x"][0], sets["query_y"][0]
        shape = query_y.shape + (family.num_outputs,) if family.is_classification else query_y.shape
        loss = call("loss(prediction, target)", family.loss, query_x.new_zeros(shape), query_y)
        if not (torch.is_tensor(loss) and loss.dim() == 0):
            fail("loss(prediction, target) of one task must be a scalar tensor")
    if not values:
        return
    if not _same(whole, sample(STREAM_TRAIN, indices)):
        fail("two calls of sample() with the same (stream, iteration, indices) gave different tasks; draw from "
             "(seed, stream, iteration, index), not from a random generator (a run would not resume, nor give the "
             "same result on another number of processes)")
    split = tasks // 2
    shards = [sample(STREAM_TRAIN, indices[:split]), sample(STREAM_TRAIN, indices[split:])]
    joined = tree_map(lambda *parts: torch.cat(parts), *shards)
    if not _same(whole, joined):
        fail(f"tasks {split}..{tasks - 1} sampled on their own differ from the same tasks sampled with the others; "
             "a task must depend on its own global index only")
    if _same(whole, sample(STREAM_EVAL, indices)):
        fail("the evaluation stream gives the training tasks; keep streams apart")


_EXAMPLES = ("support_x", "support_y", "query_x", "query_y")


def _fields(batch: Any) -> dict[str, torch.Tensor] | None:
    """A batch's support and query sets by name (a TaskBatch, or a dict with those keys), or None."""
    if isinstance(batch, dict):
        found = {key: batch.get(key) for key in _EXAMPLES}
    else:
        found = {key: getattr(batch, key, None) for key in _EXAMPLES}
    return found if all(torch.is_tensor(value) for value in found.values()) else None


def _leaves(batch: Any) -> list[tuple[str, Any]]:
    """(name, leaf) of every leaf of a batch, named as a user would: support_y, "seed", [2]."""
    if isinstance(batch, dict):
        return [(f"[{key!r}]", value) for key, value in batch.items()]
    if hasattr(batch, "_fields"):
        return list(zip(batch._fields, batch))
    if isinstance(batch, (tuple, list)):
        return [(f"[{i}]", value) for i, value in enumerate(batch)]
    return [("", batch)]


def _check_batch(batch: Any, tasks: int, dtype: torch.dtype | None, fail, values: bool = True) -> None:
    """Tensors with the tasks first, floating-point ones in the run's dtype and (with `values`) finite."""
    leaves = tree_flatten(batch)[0]
    if not leaves or not all(torch.is_tensor(leaf) for leaf in leaves):
        kinds = sorted({type(leaf).__name__ for leaf in leaves if not torch.is_tensor(leaf)}) or ["nothing"]
        fail(f"sample() must return a TaskBatch or a dict of tensors (the tasks first), got a "
             f"{type(batch).__name__} holding {', '.join(kinds)}")
    for part, value in _leaves(batch):
        for leaf in tree_flatten(value)[0]:
            what = f"sample(...){'.' if part and part[0] != '[' else ''}{part}"
            if leaf.dim() == 0 or leaf.shape[0] != tasks:
                fail(f"{what} has shape {tuple(leaf.shape)}; it must have the {tasks} tasks asked for first")
            if leaf.is_floating_point():
                if dtype is not None and leaf.dtype != dtype:
                    fail(f"{what} is {str(leaf.dtype).replace('torch.', '')}, but the run computes in "
                         f"{str(dtype).replace('torch.', '')} (engine.dtype); sample in the dtype from_config is given")
                bad = ~torch.isfinite(leaf) if values else None
                if values and bool(bad.any()):
                    fail(f"{what} holds {int(bad.sum())} values that are not finite (NaN or infinite), in task(s) "
                         f"{sorted({int(i) for i in torch.nonzero(bad)[:, 0].tolist()})[:5]}; the data, not the "
                         "training, would be at fault")


def _check_examples(family: Any, batch: Any, sample_one, fail) -> None:
    """Support and query sets: inputs of input_shape, a target per input, support= and query= honoured
    (`sample_one(support=, query=)` gives one task's sets with those numbers of examples)."""
    sets = _fields(batch)
    for split in ("support", "query"):
        x, y = sets[f"{split}_x"], sets[f"{split}_y"]
        if x.dim() < 2 or tuple(x.shape[2:]) != tuple(family.input_shape):
            fail(f"sample(...).{split}_x is {tuple(x.shape)}: {tuple(x.shape[2:])} per example, but input_shape says "
                 f"{tuple(family.input_shape)} (tasks, examples, *input_shape)")
        if y.dim() < 2 or y.shape[1] != x.shape[1]:
            fail(f"sample(...).{split}_y is {tuple(y.shape)} for {x.shape[1]} examples in {split}_x {tuple(x.shape)}; "
                 "each example needs its target")
    # Ask for other numbers with the same total per task, so a family with few examples can give them.
    support, query = family.support, family.query
    if support > 1 or query > 1:
        other = (support - 1, query + 1) if support > 1 else (support + 1, query - 1)
        asked = sample_one(support=other[0], query=other[1])
        for split, count, default in (("support", other[0], support), ("query", other[1], query)):
            if asked is not None and asked[f"{split}_x"].shape[1] == sets[f"{split}_x"].shape[1]:
                fail(f"sample(..., {split}={count}) gave as many {split} examples as its default {split} = {default}; "
                     f"it must honour {split}= (evaluation asks for eval.shots and eval.query)")


def _same(a: Any, b: Any) -> bool:
    leaves_a, spec_a = tree_flatten(a)
    leaves_b, spec_b = tree_flatten(b)
    return spec_a == spec_b and all(torch.is_tensor(x) and torch.is_tensor(y) and x.shape == y.shape and
                                    torch.equal(x, y) for x, y in zip(leaves_a, leaves_b))
