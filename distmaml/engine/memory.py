"""Memory of one meta-iteration, estimated before the first one runs, and the check that uses it.

The estimate runs the engine's own meta-gradient on `meta` tensors (shapes and dtypes, no data, no
memory) under a dispatch mode that adds up the bytes of every tensor the operations create and
subtracts them when the tensor is freed; the peak of that sum is the peak of what the real run
allocates (they agree to the byte on the CPU). A probe costs a few inner steps of Python dispatch,
so a long unroll is not probed in full: probes at K = 2 and 3, with and without checkpointing,
give the memory a step's graph keeps (b) and a segment boundary's stored weights (w), and each
plan's peak follows from them:

    second order, no checkpointing      base + D b       (D = differentiated steps: K, or T)
    checkpointed segments               the larger of: every stored boundary with the query's
                                        graph (before the backward pass rebuilds a segment), and
                                        max over segments j of (j w + length_j b') while segment j
                                        is rebuilt (b' what a rebuilt step holds)
    first order, implicit, K <= 3       probed as they are (flat in K)

A run that would not fit is refused before it starts, with what would fit instead.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Callable, NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map

from distmaml.errors import ConfigError
from distmaml.machine_memory import GIB, available_bytes, describe_size
from distmaml.meta import FirstOrder, Inner, Tasks, num_tasks, plan_segments

RECOMPUTE_NODE = "_RecomputeBackward"  # the autograd node of distmaml.meta.checkpointing's recomputation


class LiveBytes(TorchDispatchMode):
    """Peak bytes of the tensors that operations create inside the mode (each storage counted once):
    overall, and before and from the moment the backward pass first rebuilds a checkpointed segment
    (the first operation run for the recomputation node of distmaml.meta.checkpointing)."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = self.before_recompute = self.recompute = 0
        self.recomputing = False
        self._seen: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if not self.recomputing:
            node = torch._C._current_autograd_node()
            self.recomputing = node is not None and node.name() == RECOMPUTE_NODE
        for value in tree_flatten(out)[0]:
            if isinstance(value, torch.Tensor):
                self._track(value.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self._seen:
            return
        self._seen.add(key)
        size = storage.nbytes()
        self.live += size
        self.peak = max(self.peak, self.live)
        if self.recomputing:
            self.recompute = max(self.recompute, self.live)
        else:
            self.before_recompute = max(self.before_recompute, self.live)
        weakref.finalize(storage, self._free, key, size)

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size


class Estimate(NamedTuple):
    peak_bytes: int  # one meta-iteration at its peak: its tensors, the weights, gradients, Adam and the batch
    fixed_bytes: int  # of which the weights, their gradient and Adam's moments: independent of the tasks
    per_step_bytes: int  # what each differentiated inner step keeps for the backward pass (b)
    boundary_bytes: int  # what a checkpointed segment boundary keeps (w)


def estimate(problem, params, tasks: Tasks, inner: Inner, meta_gradient_fn: Callable,
             multi_step_loss: bool = False) -> Estimate:
    """Peak memory of one meta-iteration of the inner loop `inner` (its rule, K, hypergradient method
    and checkpointing) on this process's tasks (their shapes only: they may be on the `meta` device).

    `meta_gradient_fn(problem, params, tasks, inner, step_weights)` is the engine's computation; it
    runs on `meta` copies of everything, at small K, and is extrapolated as the module docstring says.
    The probes ask the method itself how it runs with k inner steps (`method.at_steps(k)`), so
    whatever method the run holds, a user's own included, is what is measured; one without that hook
    is probed as it is. With `multi_step_loss` every step's query graph stays alive (MAML++).
    """
    meta_problem = problem.to("meta")
    meta_params = {name: torch.empty_like(value, device="meta").requires_grad_() for name, value in params.items()}
    meta_tasks = tree_map(lambda t: torch.empty(t.shape, dtype=t.dtype, device="meta"), tasks)
    method = inner.method
    at_steps = getattr(method, "at_steps", lambda steps: method)

    def probe(steps: int, checkpoint: str = "none", segment: int | None = None) -> LiveBytes:
        probed = dataclasses.replace(inner, steps=steps, method=at_steps(steps), checkpoint=checkpoint,
                                     checkpoint_segment=segment, progress=None)
        weights = torch.full((steps,), 1 / steps, device="meta") if multi_step_loss and steps else None
        with LiveBytes() as counter:
            meta_gradient_fn(meta_problem, meta_params, meta_tasks, probed, weights)
        return counter

    differentiated = method.differentiated(inner.steps)
    plan = plan_segments(inner.steps, differentiated, inner.checkpoint, inner.checkpoint_segment)
    lengths = [end - start for start, end, checkpointed in plan if checkpointed]
    step = boundary = 0
    if differentiated == 0 or inner.steps <= 3:  # flat in K, or small enough to probe as it is
        peak = probe(min(inner.steps, 3), checkpoint=inner.checkpoint if inner.steps else "none",
                     segment=inner.checkpoint_segment).peak
    elif not lengths:
        # From K = 2 on every step is alike (the first differs: it starts from the unbatched theta).
        two, three = probe(2).peak, probe(3).peak
        step = max(three - two, 0)
        peak = two + (differentiated - 2) * step
    else:
        # Checkpointed: up to the end of the query's backward pass every stored segment input is
        # alive; then the segments are rebuilt last to first, and while segment j (of length L_j)
        # is rebuilt the inputs of segments 1..j still are (segment 0 starts from theta, unless
        # truncated mode's first-order head came first). Probes of one-step segments at K = 2 and
        # 3 give the weight copy a boundary stores (w); two-step segments at K = 4 give what a
        # rebuilt step holds (b).
        every_two, every_three = probe(2, "every_step"), probe(3, "every_step")
        pairs = probe(4, "segments", 2)
        boundary = max(every_three.peak - every_two.peak, 0)
        step = max(pairs.recompute - every_two.recompute, 0)
        head = int(plan[0][2] is False)
        before = every_two.before_recompute + (len(lengths) - 2 + head) * boundary
        rebuild = every_two.recompute - boundary - step + max(
            (j + head) * boundary + length * step for j, length in enumerate(lengths))
        peak = max(before, rebuild)
    state = sum(value.numel() * value.element_size() for value in params.values())
    data = sum(t.numel() * t.element_size() for t in tree_flatten(tasks)[0] if torch.is_tensor(t))
    fixed = 4 * state  # weights, their gradient and Adam's two moments live through the iteration
    return Estimate(peak + fixed + data, fixed, step, boundary)


def budget_bytes(config, device: torch.device) -> tuple[int, str]:
    """(bytes a run may use, where the number comes from): engine.memory_budget, else what is available."""
    if config.engine.memory_budget:
        return int(config.engine.memory_budget * GIB), f"engine.memory_budget = {config.engine.memory_budget:g} GiB"
    return available_bytes(device)


def stored_if_it_fits(problem, params, tasks: Tasks, config, inner: Inner, meta_gradient_fn: Callable,
                      device: torch.device) -> tuple[Inner, str, Estimate | None]:
    """inner.checkpoint = auto recomputes only when it must: the unroll stored whole (checkpoint "none",
    the fastest) where its estimated peak fits the budget, else recomputed in segments of about sqrt(K)
    steps. Either gives the same bits (distmaml.meta.checkpointing); the choice is time against memory.
    Returns the inner loop to run, the choice in words (for the log), and the stored unroll's estimate
    where it was chosen (check_fits need not make it again)."""
    stored = dataclasses.replace(inner, checkpoint="none")
    found = estimate(problem, params, tasks, stored, meta_gradient_fn, config.inner.multi_step_loss)
    budget, where = budget_bytes(config, device)
    if found.peak_bytes <= budget:
        return stored, (f"inner.checkpoint = auto: stores the unroll (about {describe_size(found.peak_bytes)} of "
                        f"the {describe_size(budget)} available, {where})"), found
    return inner, (f"inner.checkpoint = auto: recomputes the unroll in segments (storing it would need about "
                   f"{describe_size(found.peak_bytes)}, more than the {describe_size(budget)} available, {where})"), None


def check_fits(problem, params, tasks: Tasks, config, inner: Inner, meta_gradient_fn: Callable, world_size: int,
               device: torch.device, found: Estimate | None = None) -> Estimate:
    """Estimate one meta-iteration of `inner` (the run's built inner loop; `found`, if given, is that
    estimate already made) and refuse, in one line, a run whose peak exceeds the memory available (or
    engine.memory_budget), naming what would fit: activation checkpointing, first order, the largest
    meta-batch (the tasks' share of the peak scales with their number)."""
    multi_step = config.inner.multi_step_loss
    if found is None:
        found = estimate(problem, params, tasks, inner, meta_gradient_fn, multi_step)
    budget, where = budget_bytes(config, device)
    if found.peak_bytes <= budget:
        return found
    tasks_here = num_tasks(tasks)
    differentiated = inner.method.differentiated(inner.steps)
    alternatives = {}
    if differentiated > 1 and inner.checkpoint == "none":
        alternatives["inner.checkpoint=auto"] = dataclasses.replace(inner, checkpoint="auto")
    if differentiated > 0:
        alternatives["inner.mode=first_order"] = dataclasses.replace(inner, method=FirstOrder(), checkpoint="none")
    sizes = {name: estimate(problem, params, tasks, changed, meta_gradient_fn, multi_step)
             for name, changed in alternatives.items()}
    fits = [f"{name} ({describe_size(size.peak_bytes)})" for name, size in sizes.items() if size.peak_bytes <= budget]
    per_task = max(found.peak_bytes - found.fixed_bytes, 1) / max(tasks_here, 1)
    most_tasks = int((budget - found.fixed_bytes) // per_task) * world_size
    if 1 <= most_tasks < config.train.meta_batch:
        fits.append(f"train.meta_batch={most_tasks}, or more processes")
    hint = f"; would fit: {', '.join(fits)}" if fits else ""
    raise ConfigError(f"one meta-iteration needs about {describe_size(found.peak_bytes)} (estimated before starting, "
                      f"for inner.steps = {config.inner.steps}, inner.mode = {config.inner.mode}, inner.checkpoint = "
                      f"{config.inner.checkpoint} and {tasks_here} task(s) on this process), more than the "
                      f"{describe_size(budget)} available ({where}){hint}; engine.memory_check=false skips this check")


class EvaluationEstimate(NamedTuple):
    peak_bytes: int  # the whole evaluation at its peak
    chunk_bytes: int  # of which one chunk of tasks: its data, its adaptation, its weights along the way
    results_bytes: int  # of which every task's metrics after every reported number of steps


def estimate_evaluation(problem, theta, family, inner, steps: int, tasks: int, shots: int | None = None,
                        query: int | None = None, chunk: int = 200) -> EvaluationEstimate:
    """Peak memory of distmaml.evaluate.evaluate with these settings, from `meta` tensors (shapes only).

    Adaptation keeps no graph, so its memory is flat in the number of steps: a probe of two steps,
    plus the weights kept at each further reported step, plus the per-task results (which grow with
    `tasks`, kept per chunk and once more when joined), plus the other chunks' tasks, all sampled first.
    """
    from distmaml.evaluate import adaptation_curves, report_steps
    from distmaml.rng import STREAM_EVAL

    counts, probed = report_steps(steps), report_steps(min(steps, 2))
    size = min(chunk, tasks)
    batch = family.to("meta").sample(STREAM_EVAL, 0, torch.arange(size, device="meta"), support=shots, query=query)
    meta_theta = {name: torch.empty_like(value, device="meta") for name, value in theta.items()}
    with LiveBytes() as counter:
        curves = adaptation_curves(problem.to("meta"), meta_theta, batch, inner, probed)
    weights = sum(value.numel() * value.element_size() for value in problem.inner_template().values())
    data = sum(t.numel() * t.element_size() for t in tree_flatten(batch)[0] if torch.is_tensor(t))
    chunk_bytes = counter.peak + data + (len(counts) - len(probed)) * size * weights
    per_value = max(value.element_size() for value in curves.values())
    results = 2 * tasks * len(counts) * len(curves) * per_value
    state = sum(value.numel() * value.element_size() for value in theta.values())
    other_batches = (-(-tasks // size) - 1) * data  # evaluate samples every chunk's tasks before adapting any
    return EvaluationEstimate(chunk_bytes + results + state + other_batches, chunk_bytes, results)


def check_evaluation_fits(problem, theta, family, inner, settings: dict, config, device: torch.device,
                          names: dict[str, str]) -> EvaluationEstimate | None:
    """Refuse, in one line naming the settings (`names`: {"tasks": "--tasks", ...}), an evaluation
    whose estimated peak exceeds the memory available (or engine.memory_budget); None when
    engine.memory_check is off."""
    if not config.engine.memory_check:
        return None
    tasks, shots, query = settings["tasks"], settings.get("shots"), settings.get("query")
    found = estimate_evaluation(problem, theta, family, inner, settings["steps"], tasks, shots, query)
    budget, where = budget_bytes(config, device)
    if found.peak_bytes <= budget:
        return found
    shown = ", ".join(f"{names[key]} = {value}" for key, value in (("tasks", tasks), ("shots", shots),
                                                                      ("query", query)) if value is not None)
    if found.results_bytes >= found.chunk_bytes:
        part, what, fewer = found.results_bytes, f"the results of {tasks} tasks", names["tasks"]
    else:
        part, what = found.chunk_bytes, "each chunk of up to 200 tasks with their examples"
        fewer = f"{names['shots']} or {names['query']}"
    raise ConfigError(f"{shown}: evaluating needs about {describe_size(found.peak_bytes)} (estimated before starting; "
                      f"{describe_size(part)} of it for {what}), more than the {describe_size(budget)} available "
                      f"({where}); fewer {fewer} would fit, or engine.memory_check=false skips this check")
