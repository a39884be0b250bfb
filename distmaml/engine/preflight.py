"""What the trainer checks before its first iteration, so that a run that cannot work fails in one line
at once instead of in a traceback later, or worse, trains on something meaningless:

- shapes, then memory: the first batch's shapes fit the family's protocol and the problem (outputs
  shaped exactly like the targets, no broadcasting loss), then one meta-iteration and the
  evaluation at the end are estimated, all on `meta` tensors: nothing is allocated for real, not
  even the model, before the estimate passed;
- the first batch, for real: the task family's values (finite, the same tasks from the same (seed,
  iteration, index), shards equal to slices), the problem on a real task, and the hypergradient
  method's ability to differentiate it.
"""

from __future__ import annotations

import dataclasses
import logging
import time

import torch

from distmaml.build import DTYPES, Learner, build
from distmaml.config import Config, ConfigError, source_of
from distmaml.engine import dist, memory
from distmaml.engine.schedule import as_runs, shard
from distmaml.engine.step import compute_meta_gradient
from distmaml.errors import SettingError
from distmaml.evaluate import evaluation_settings, refuse_shots
from distmaml.machine_memory import describe_size
from distmaml.meta import FirstOrder, SecondOrder, check_method, check_problem, task_at
from distmaml.meta.problem import reads_values
from distmaml.meta.reachability import reached_flags, unreached, zero_at_start
from distmaml.rng import STREAM_TRAIN
from distmaml.tasks import check_family

log = logging.getLogger("distmaml.train")

EVAL_KEYS = {"tasks": "eval.tasks", "shots": "eval.shots", "query": "eval.query"}
FAMILY_CHECK_TASKS = 6  # tasks of the first batch the family check samples (sharded 3 + 3)


def _family_tasks(config: Config) -> int:
    # No more tasks than a meta-batch holds (what the memory estimate vouched for), two at least to shard.
    return min(FAMILY_CHECK_TASKS, max(2, config.train.meta_batch))


def shapes_only(config: Config, family) -> Learner | None:
    """The learner `config` describes, on the `meta` device: every shape, no memory. None for a model or
    problem whose construction reads values (user code; distillation counts its classes' examples), which
    then is estimated once built for real."""
    try:
        with torch.device("meta"):
            return build(config, "meta", family=family.to("meta"))
    except ConfigError:
        return None
    except RuntimeError as err:
        if "meta tensor" not in str(err):
            raise
        return None


def check_shapes(config: Config, shapes: Learner) -> None:
    """On `meta` tensors, before the memory estimate runs the family and the problem on them: the
    first batch's shapes fit the family's protocol and the problem."""
    _family_and_problem(config, shapes, torch.device("meta"), values=False)


def _family_and_problem(config: Config, learner: Learner, device: torch.device, values: bool):
    """The family's protocol on the first batch (its values too, unless `values` is False), then the
    problem on one of its tasks; returns that one-task batch."""
    check_family(learner.family, tasks=_family_tasks(config), where=f"task.family = {config.task.family!r}:",
                 dtype=DTYPES[config.engine.dtype][0], iteration=0, device=device, values=values)
    batch = learner.family.sample(STREAM_TRAIN, 0, torch.arange(1, device=device))
    check_problem(learner.problem, learner.theta, task_at(batch, 0), where=f"problem.name = {config.problem.name!r}:")
    return batch


def check_memory(config: Config, ctx: dist.Context, learner: Learner) -> str:
    """Refuse a run whose meta-iteration, or whose evaluation at the end, would not fit (engine.memory_check).
    Returns the inner checkpointing the run should use: inner.checkpoint, or for `auto` what the
    estimate chose (the stored unroll where it fits; recomputed segments where it does not, or where
    there is no estimate to go by)."""
    if config.eval.at_end:  # the evaluation at the end refuses shots its tasks do not have: say so now
        refuse_shots(learner.family, evaluation_settings(config), EVAL_KEYS, config.task.family)
    inner, chosen = learner.inner, False
    tasks = shard(config, ctx, inner.method)
    if config.engine.memory_check and len(tasks):
        # Shapes only: sampling for real could itself exhaust memory (task.query = 100000000).
        shapes = learner.family.to("meta").sample(STREAM_TRAIN, 0, torch.arange(len(tasks), device="meta"))

        problem, probed = learner.problem, inner
        if config.online.runs:  # the lookahead from this process's runs, their stored states counted
            problem, shapes, probed = as_runs(learner, shapes, inner)
            if not learner.theta:  # nothing to learn (Learning to Reweight): only the runs' own steps
                probed = dataclasses.replace(probed, method=FirstOrder())
        try:
            found = None
            if inner.checkpoint == "auto":
                probed, choice, found = memory.stored_if_it_fits(problem, learner.theta, shapes, config, probed,
                                                                 probe, ctx.device)
                inner = dataclasses.replace(inner, checkpoint=probed.checkpoint,
                                            checkpoint_segment=probed.checkpoint_segment)
                log.info("%s", choice)
                chosen = True
            found = memory.check_fits(problem, learner.theta, shapes, config, probed, probe,
                                      ctx.world_size, ctx.device, found)
        except RuntimeError as err:  # the problem ran on shape-only tensors (check_shapes): the method cannot
            if not reads_values(err):
                raise
            log.warning("memory estimate skipped: inner.mode = %r reads tensor values, which the estimate's "
                        "shape-only tensors do not have; the run starts unestimated (engine.memory_check=false "
                        "says so without trying)", config.inner.mode)
            inner, chosen = learner.inner, False
        else:
            log.info("estimated peak memory of one meta-iteration: %s on this process",
                     describe_size(found.peak_bytes))
    if inner.checkpoint == "auto" and not chosen:
        log.info("inner.checkpoint = auto: recomputes the unroll in segments, with no memory estimate to store it by")
    if config.eval.at_end and ctx.is_main:  # only the main process evaluates
        memory.check_evaluation_fits(learner.problem, learner.theta, learner.family, learner.inner,
                                     evaluation_settings(config), config, ctx.device, EVAL_KEYS)
    return inner.checkpoint


PATH_PROBE_STEPS = 3  # inner steps of the path probe: the first step (which differs) and two like all the others


def probe_seconds(learner: Learner, batch, inner, batched: bool, device: torch.device) -> float:
    """Seconds of one meta-gradient of `batch` by one path, after a call that warms it up (a first
    call's allocations and kernel choices are not the path's cost)."""

    def meta_gradient() -> None:
        compute_meta_gradient(learner.problem, learner.theta, batch, inner, batched)
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    meta_gradient()
    started = time.perf_counter()
    meta_gradient()
    return time.perf_counter() - started


def choose_path(config: Config, ctx: dist.Context, learner: Learner, recorded: bool | None) -> bool:
    """engine.batched, or for `auto` the path this run takes: True for the batched one, False for the
    per-task loop. Batching pays on a GPU and for most networks on a CPU, but not everywhere (a
    convolution on a CPU, whose batched backward rearranges memory): `auto` times both on a probe of
    the first batch (a few inner steps, the run's own method), every process alike, and takes the one
    faster over all of them. A resumed run takes what its checkpoint recorded, so that it goes on bit
    for bit (the two paths round differently). A CUDA graph captures the batched path."""
    if isinstance(config.engine.batched, bool):
        return config.engine.batched
    if recorded is not None:
        log.info("engine.batched = auto: %s, as the checkpoint recorded", _path_name(recorded))
        return recorded
    if config.engine.cuda_graph:
        return True
    tasks = dist.shard(config.train.meta_batch, ctx.rank, ctx.world_size)
    seconds = torch.zeros(2, dtype=torch.float64, device=ctx.device)
    if len(tasks):
        batch = learner.family.sample(STREAM_TRAIN, 0, torch.arange(tasks.start, tasks.stop, device=ctx.device))
        steps = min(config.inner.steps, PATH_PROBE_STEPS)
        method = learner.inner.method
        inner = dataclasses.replace(learner.inner, steps=steps, progress=None,
                                    method=getattr(method, "at_steps", lambda steps: method)(steps))
        seconds = torch.tensor([probe_seconds(learner, batch, inner, batched, ctx.device) for batched in (True, False)],
                               dtype=torch.float64, device=ctx.device)
    batched_s, loop_s = dist.all_reduce_sum([seconds], ctx)[0].tolist()
    batched = batched_s <= loop_s
    log.info("engine.batched = auto: %s (a probe of %d inner step(s) on the first batch took %.3g s batched, %.3g s "
             "task by task%s)", _path_name(batched), min(config.inner.steps, PATH_PROBE_STEPS), batched_s, loop_s,
             ", summed over the processes" if ctx.distributed else "")
    return batched


def _path_name(batched: bool) -> str:
    return "the batched path" if batched else "the per-task loop"


def probe(problem, theta, batch, inner, step_weights):
    """The engine's meta-gradient as the memory estimate probes it (distmaml.engine.memory.estimate)."""
    return compute_meta_gradient(problem, theta, batch, inner, step_weights=step_weights)


def check_first_batch(config: Config, learner: Learner) -> None:
    """The family, the problem and the method on real tasks of the first batch, each refused in one
    line naming the class (or setting) and what is wrong."""
    batch = _family_and_problem(config, learner, next(learner.model.parameters()).device, values=True)
    check_method(learner.problem, learner.theta, batch, learner.inner)
    if config.inner.first_order_iterations:  # MAML++'s annealing starts first order: it must work too
        first_order = dataclasses.replace(learner.inner, method=FirstOrder())
        try:
            check_method(learner.problem, learner.theta, batch, first_order)
        except SettingError as err:
            raise SettingError("inner.first_order_iterations", config.inner.first_order_iterations,
                               f"starts training with inner.mode = first_order, which {err.reason}") from None
    # A method may also say where a setting, though valid, is far from what its estimate needs.
    advise = getattr(learner.inner.method, "warnings", None)
    for line in advise(learner.problem, learner.theta, task_at(batch, 0), learner.inner) if advise else ():
        log.warning("%s", line)


def refuse_unreached(config: Config, learner: Learner, tasks) -> None:
    """The trainer's first-iteration refusal (distmaml.engine.step.MetaStep), in its words, for gradcheck:
    where even the exact hypergradient of the unrolled objective (second order) is 0 in a whole
    tensor of phi, there is nothing to check. The method under test is not asked: a method that
    wrongly returns 0 is what gradcheck exists to fail."""
    exact = dataclasses.replace(learner.inner, method=SecondOrder())
    result = compute_meta_gradient(learner.problem, learner.theta, tasks, exact)
    allowed = [*config.train.allow_unreached, *zero_at_start(learner.model)]
    names = unreached(learner.theta, reached_flags(list(result.grad_sum.values())), allowed)
    if names:
        raise unreached_error(config, names)


def _unreached_causes(config: Config, cause: str | None = None) -> str:
    if cause:
        return cause
    if config.inner.steps == 0:
        return "inner.steps = 0: phi acts through the inner steps, and there are none"
    return ("likely an outer loss or start that detaches phi, an inner loss that ignores phi, weights saturated by "
            "their initial value (a sigmoid of a large logit has zero slope), or a task family whose outputs the "
            "problem cannot use (distill on a family with one output)")


def unreached_error(config: Config, names: list[str], cause: str | None = None) -> ConfigError:
    """The refusal of a run whose first meta-batch's hypergradient is exactly 0 in every element of
    the tensors `names` of phi (distmaml.meta.reachability), naming the likely cause."""
    key = "inner.steps" if config.inner.steps == 0 else "problem.name"
    where = source_of(config, key)
    where = source_of(config, "problem.name") if where == "default" else where
    value = getattr(config.inner, "steps") if key == "inner.steps" else config.problem.name
    them = "it" if len(names) == 1 else "them"
    where = "" if where == "default" else f"{where}: "  # a key nobody set has no source to name
    return ConfigError(f"{where}{key} = {value!r}: the first meta-batch's hypergradient is exactly 0 in every "
                       f"element of {', '.join(names)} (inner.mode = {config.inner.mode}), so training cannot change "
                       f"{them}: {_unreached_causes(config, cause)}; if only some tasks use {them}, list {them} in "
                       "train.allow_unreached")


def unreached_warning(config: Config, names: list[str], first: int, last: int) -> str:
    """The warning for tensors of phi whose meta-gradient stayed exactly 0 for a whole logging window."""
    return (f"the meta-gradient of {', '.join(names)} was exactly 0 at every iteration from {first} to {last}: "
            f"training no longer changes {'it' if len(names) == 1 else 'them'} ({_unreached_causes(config)}; "
            "train.allow_unreached silences this for tensors only some tasks use)")
