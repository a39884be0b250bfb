"""A bi-level problem: meta-parameters phi, an inner problem over weights w, an outer objective.

    min_phi  sum_tasks  outer_loss(w_K(phi, task), phi, task)
    w_0 = start(phi, task),  w_{k+1} = rule.step(w_k, grad_w inner_loss(w_k, phi, task, k), ...)

A problem is a few pure functions of ONE task (the engine vmaps them over a batch of tasks), in the
style of distmaml.tasks.TaskFamily and distmaml.meta.rules.Rule:

    phi = problem.meta_parameters()          # {name: tensor}: whatever the meta-parameters are
    w0 = problem.start(phi, task)            # MAML: phi's weights; hyperparameter learning: a fresh
                                             # initialisation drawn from the task's own seed
    problem.inner_loss(w, phi, task, step)   # a scalar; `step` picks the step's mini-batch, if any: a
                                             # Python int, or online each run's own counter (an int64
                                             # tensor) in a problem whose `modes` include "online"
    problem.outer_loss(w, phi, task)         # a scalar
    problem.metrics(w, phi, task)            # {"loss": outer loss, ...}: what logs and evaluation report
    problem.inner_template()                 # {name: tensor}: the shapes of w (values unused)
    problem.to(device)                       # the same problem on another device ("meta": shapes only)
    problem.describe(phi)                    # optional: phi's learned values as a report states them
    problem.modes                            # optional: ("episodic",) if absent; ("episodic", "online") for a
                                             # problem whose runs may persist (distmaml.meta.online)
    problem.drawing(phi)                     # optional: what `distmaml plot` draws of phi, as (kind, data):
                                             # ("examples", {"inputs", "labels"}) or ("function", {"x", "learned"})

A task is any pytree of tensors (its batch has a leading task dimension); the model behind the
losses may take several inputs. The inner optimizer is a Rule; its learned parameters (step sizes)
are entries of phi like any other. How phi's gradient is computed is a Method's business
(distmaml.meta.methods): the problem never knows which one differentiates it.

`check_problem` runs each function once on one task and names, in one line, what breaks the protocol
(phi not a dict of floating-point tensors, a loss or metric that is not one floating-point number, a
to() that returns no problem, a describe() whose result the evaluation's JSON cannot hold); a problem
may add its own `check_task(phi, task) -> str | None` (what is wrong with the task it is given:
MAML's says so when a model's outputs and the targets would broadcast in the loss).
`check_meta_parameters` checks meta_parameters()'s result where phi is first read.
"""

from __future__ import annotations

import json
import traceback
from typing import Any, Protocol, runtime_checkable

import torch
from torch.func import vmap

from distmaml.errors import ConfigError
from distmaml.meta.functional import Params


@runtime_checkable
class Problem(Protocol):
    def meta_parameters(self) -> Params:
        """phi's initial values (without the inner rule's learned parameters, which the rule adds)."""

    def inner_template(self) -> Params:
        """Tensors shaped like the inner weights w (the rule's learned step sizes are sized from them)."""

    def start(self, phi: Params, task: Any) -> Params:
        """One task's inner weights before the first step."""

    def inner_loss(self, weights: Params, phi: Params, task: Any, step: int) -> torch.Tensor:
        """One task's inner objective at inner step `step` (a Python int), a scalar."""

    def outer_loss(self, weights: Params, phi: Params, task: Any) -> torch.Tensor:
        """One task's outer objective after adaptation, a scalar."""

    def metrics(self, weights: Params, phi: Params, task: Any) -> dict[str, torch.Tensor]:
        """Scalars reported by logs and evaluation; "loss" is the outer loss."""

    def to(self, device: torch.device | str) -> "Problem":
        """The same problem on `device`."""

    # Optional: describe(phi) -> {name: value or list}, phi's learned values in the units a report
    # states (a weight decay, not its log); evaluation adds them to its result.


REQUIRED = ("meta_parameters", "inner_template", "start", "inner_loss", "outer_loss", "metrics", "to")


class ProblemError(ConfigError):
    """A problem that does not do what the protocol asks, in one line."""


def missing_members(problem: Any) -> list[str]:
    return [name for name in REQUIRED if not callable(getattr(problem, name, None))]


def check_meta_parameters(phi: Any, where: str, label: str = "meta_parameters()") -> None:
    """Raise ProblemError unless `phi` (what `label` returned) is a dict of floating-point tensors:
    phi is what the meta-gradient differentiates, and only floating-point tensors have gradients."""
    if not isinstance(phi, dict):
        raise ProblemError(f"{where}: {label} must return a dict of floating-point tensors, got {type(phi).__name__}")
    for key, value in phi.items():
        if not torch.is_tensor(value):
            raise ProblemError(f"{where}: {label} gives {key!r} as {_a(type(value).__name__)}; phi must be a dict of "
                               f"floating-point tensors (torch.tensor({value!r}) if a number)")
        if not value.is_floating_point():
            raise ProblemError(f"{where}: {label} gives {key!r} of dtype {value.dtype}; phi must be a dict of "
                               "floating-point tensors, the only ones with a gradient")


def not_a_scalar(value: Any) -> str | None:
    """What keeps `value` from being one floating-point number of one task ("got dtype torch.int64"),
    or None for a 0-dim floating-point tensor."""
    if not torch.is_tensor(value):
        return f"got {type(value).__name__}"
    wrong = []
    if not value.is_floating_point():
        wrong.append(f"dtype {value.dtype}")
    if value.dim() != 0:
        wrong.append(f"shape {tuple(value.shape)}")
    return f"got {' and '.join(wrong)}" if wrong else None


def check_problem(problem: Any, phi: Params, task: Any, where: str = "problem") -> None:
    """Raise ProblemError unless `problem` follows the protocol on one `task` (no task dimension):
    the task is what the problem reads (its optional `check_task(phi, task)` says what is wrong,
    e.g. outputs that a loss would broadcast against their targets), start gives the inner
    template's names and shapes, and every loss is a floating-point scalar. A function that fails
    on the task is named in one line, with where it failed."""
    name = type(problem).__name__
    if missing := missing_members(problem):
        raise ProblemError(f"{where} {name} lacks {', '.join(missing)} (see distmaml.meta.Problem)")

    def call(label: str, function, *args, on_task: bool = True):
        try:
            return function(*args)
        except Exception as err:  # noqa: BLE001 - the problem (or the task it was given) is broken: one line
            frame = _user_frame(err)
            if reads_values(err) and on_task:
                raise ProblemError(
                    f"{where} {name}: {label} reads a tensor's value (.item(), float(), a Python if on a tensor) at "
                    f"{frame.filename}:{frame.lineno}; problems run batched over tasks (torch.func.vmap) and, for the "
                    "memory estimate, on shape-only tensors, where no value can be read: write it with tensor "
                    "operations (torch.where, clamp) instead") from None
            message = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
            what = f" on a task of type {type(task).__name__}" if on_task else ""
            raise ProblemError(f"{where} {name}: {label} failed{what}: {type(err).__name__}: {message} "
                               f"({frame.filename}:{frame.lineno})") from None

    check_meta_parameters(phi, f"{where} {name}", "phi")
    check_task = getattr(problem, "check_task", None)
    if callable(check_task):
        with torch.no_grad():
            wrong = call("check_task", check_task, phi, task)
        if wrong:
            raise ProblemError(f"{where} {name}: {wrong}")
    template = problem.inner_template()
    weights = call("start", problem.start, phi, task)
    if not isinstance(weights, dict):
        raise ProblemError(f"{where} {name}: start() must return a dict of tensors, got {type(weights).__name__}")
    if set(weights) != set(template):
        raise ProblemError(f"{where} {name}: start() gives weights {sorted(weights)}, inner_template() names "
                           f"{sorted(template)}")
    for key, value in weights.items():
        if not torch.is_tensor(value) or value.shape != template[key].shape:
            shape = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
            raise ProblemError(f"{where} {name}: start() gives {key} of shape {shape}, inner_template() says "
                               f"{tuple(template[key].shape)}")
    metrics = call("metrics", problem.metrics, weights, phi, task)
    if not isinstance(metrics, dict):
        raise ProblemError(f"{where} {name}: metrics() must return a dict of floating-point scalar tensors "
                           f"({{'loss': ..., ...}}), got {type(metrics).__name__}")
    # The outer loss at weights that track their gradient: one call shows it a scalar and not detached.
    with torch.enable_grad():
        tracked = {key: value.detach().requires_grad_() for key, value in weights.items()}
        outer = call("outer_loss", problem.outer_loss, tracked, phi, task)
    for label, value in (("inner_loss", call("inner_loss", problem.inner_loss, weights, phi, task, 0)),
                         ("outer_loss", outer), ("metrics()['loss']", metrics.get("loss"))):
        if wrong := not_a_scalar(value):
            raise ProblemError(f"{where} {name}: {label} of one task must be a floating-point scalar tensor, {wrong}")
    for key, value in metrics.items():
        if not isinstance(key, str):
            raise ProblemError(f"{where} {name}: metrics() names a metric {key!r}; its names must be strings")
        # Logs and evaluation average each metric over tasks and report it as one number.
        if wrong := not_a_scalar(value):
            raise ProblemError(f"{where} {name}: metrics()[{key!r}] must be a scalar (a 0-dim floating-point tensor, "
                               f"one number per task), {wrong}")
    if "online" in getattr(problem, "modes", ()):  # a persistent run's inner loss gets its counter as a tensor
        call("inner_loss at a tensor step (its modes include online)", problem.inner_loss, weights, phi, task,
             torch.tensor(0, device=next(iter(weights.values())).device))
    # A loss cut from the graph (.detach(), .item() wrapped back into a tensor) gives every method a
    # hypergradient of 0, or nothing to differentiate at all: say so here, before any method meets it.
    if not outer.requires_grad:
        raise ProblemError(f"{where} {name}: outer_loss is detached from the graph: it depends on neither the inner "
                           "weights nor phi, so no hypergradient can reach phi (return the loss without .detach())")
    # The engine maps the losses over a batch of weights: a loss that reads a value fails only there.
    batched = {key: value.unsqueeze(0) for key, value in weights.items()}
    call("inner_loss", vmap(lambda w: problem.inner_loss(w, phi, task, 0)), batched)
    call("outer_loss", vmap(lambda w: problem.outer_loss(w, phi, task)), batched)
    _check_to(problem, phi, weights, where, name, call)
    # describe() reports phi's values, which shape-only tensors do not have: checked on real ones.
    if callable(getattr(problem, "describe", None)) and not any(value.is_meta for value in phi.values()):
        _check_described(call("describe", problem.describe, phi, on_task=False), f"{where} {name}")


def _check_to(problem: Any, phi: Params, weights: Params, where: str, name: str, call) -> None:
    """to() returns the problem on a device (the memory estimate moves it to "meta", evaluation to
    another device): tried on the device phi is on, where it may also be a copy."""
    device = next(iter({**phi, **weights}.values())).device
    moved = call("to", problem.to, device, on_task=False)
    if moved is None or (missing := missing_members(moved)):
        got = "None" if moved is None else f"a {type(moved).__name__}, which lacks {', '.join(missing)}"
        raise ProblemError(f"{where} {name}: to({str(device)!r}) returned {got}; it must return the problem on that "
                           "device (an object that follows distmaml.meta.Problem, e.g. self or a copy)")


def _check_described(described: Any, where: str) -> None:
    """describe(phi)'s result goes into the evaluation's result (summary.json, `distmaml eval --json`)
    as it is: JSON, in which only NaN and infinities are turned into null (as the writer does). Refused
    here, not after the training that it would have ended."""
    wants = ("describe(phi) must return a dict of numbers, strings, lists and dicts (a tensor as its .tolist() or "
             ".item())")
    if not isinstance(described, dict):
        raise ProblemError(f"{where}: {wants}, got {type(described).__name__}")
    try:
        found = _not_json(described, "describe()")
        if found is None:
            json.dumps(described)  # a part that contains itself; NaN is fine, the writer makes it null
    except (RecursionError, ValueError):
        raise ProblemError(f"{where}: {wants}; its result contains itself") from None
    if found is not None:
        path, value = found
        raise ProblemError(f"{where}: {wants}; {path} is {_a(type(value).__name__)}, which JSON cannot hold")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _not_json(value: Any, path: str) -> tuple[str, Any] | None:
    """The first part of `value` that json.dumps cannot write, as (where, the part), or None."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key is not None and not isinstance(key, (str, int, float, bool)):
                return f"{path}'s key {key!r}", key
            if found := _not_json(item, f"{path}[{key!r}]"):
                return found
        return None
    if isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            if found := _not_json(item, f"{path}[{index}]"):
                return found
        return None
    return None if value is None or isinstance(value, (str, int, float, bool)) else (path, value)


# What torch says when code reads a value under vmap, or from a shape-only (meta) tensor.
_VALUE_READS = ("vmap: It looks like you're", "cannot be called on meta tensors", "on a meta tensor",
                "Cannot copy out of meta tensor", "data-dependent")


def reads_values(err: BaseException) -> bool:
    return isinstance(err, RuntimeError) and any(text in str(err) for text in _VALUE_READS)


def _user_frame(err: BaseException) -> traceback.FrameSummary:
    """The innermost frame outside torch: where the problem's own code failed."""
    frames = traceback.extract_tb(err.__traceback__)
    outside = [frame for frame in frames if "/torch/" not in frame.filename.replace("\\", "/")]
    return (outside or frames)[-1]
