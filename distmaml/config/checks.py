"""Impossible values and contradictions in a loaded configuration, each reported against its key.

config.from_flat runs `check_values` on every configuration it builds. What a component owns is
checked by that component where it is built, in the same one-line form: a hypergradient method
its settings and the rules it can differentiate (distmaml.meta.methods), a rule its settings
(distmaml.meta.rules), a problem its settings and an inner.adapt prefix that matches no weight, a
family its data (an Omniglot character's 20 drawings). Nothing is checked twice.
"""

from __future__ import annotations

import dataclasses
import math
import typing

from distmaml.config.schema import PROBLEM_SECTIONS, OnlineConfig, TrainingRunConfig
from distmaml.errors import ConfigError


def _check_inner(config, fail, at_least) -> None:
    """The inner loop's own settings; the rule's (inner.momentum, inner.betas, inner.eps,
    inner.schedule_blocks) are the rule's to check (distmaml.meta.rules), as a method's are the method's."""
    if any(not isinstance(prefix, str) or not prefix for prefix in config.inner.adapt):
        fail("inner.adapt", "must list non-empty name prefixes")
    at_least("inner.multi_step_anneal", 0)
    at_least("inner.first_order_iterations", 0)


def _check_problem(config, fail) -> None:
    """Which problems' sections apply. Their values (maml.proximal, weight_decay.init, distill.per_class,
    training_run.batch_size, ...) are each problem's to check when it is built (distmaml.meta.problems),
    some against the data (distill.per_class against the fewest examples of a class)."""
    name = config.problem.name
    if not name.strip():
        fail("problem.name", "must name a problem")
    if "training_run" in PROBLEM_SECTIONS.get(name, ()):
        return
    # Any other problem (MAML's tasks, your own builder, which gets problem.args) never reads these:
    # a value given there would change nothing the user can see, so it is refused rather than ignored.
    runs = ", ".join(problem for problem, sections in PROBLEM_SECTIONS.items() if "training_run" in sections)
    for spec in dataclasses.fields(TrainingRunConfig):
        if getattr(config.training_run, spec.name) != spec.default:
            fail(f"training_run.{spec.name}", f"applies to the problems that train a network from scratch ({runs}), "
                 f"not to problem.name = {name!r}")


def _check_online(config, fail, at_least, source) -> None:
    """The online schedule's settings; online, train.meta_batch is the runs and inner.steps the unroll
    (set here from online.*: given otherwise, they are refused)."""
    online = config.online
    at_least("online.runs", 0)
    if not online.runs and config.training_run.outer == "next_batch":
        fail("training_run.outer", "the next mini-batch is a persistent run's (online.runs >= 1); an episode's "
             "outer loss is on held-out data")
    if not online.runs:
        for spec in dataclasses.fields(OnlineConfig):
            if spec.name != "runs" and getattr(online, spec.name) != spec.default:
                fail(f"online.{spec.name}", "applies to online runs (online.runs >= 1)")
        return
    at_least("online.unroll", 1)
    at_least("online.horizon", 0)
    if online.horizon and online.horizon < online.unroll:
        fail("online.horizon", f"must be at least online.unroll ({online.unroll}), or 0 (no horizon)")
    if online.horizon % online.unroll:
        fail("online.horizon", f"must be a multiple of online.unroll ({online.unroll}): runs start again at the end "
             "of an unroll")
    if not 0 < online.max_resets <= 1:
        fail("online.max_resets", "must be a fraction in (0, 1]")
    for key, value, meaning in (("inner.steps", online.unroll, "the unroll, online.unroll"),
                                ("train.meta_batch", online.runs, "the runs, online.runs")):
        section, name = key.split(".")
        if source(key) != "default" and getattr(getattr(config, section), name) != value:
            fail(key, f"online, it is {meaning} ({value}): leave it out")
        setattr(getattr(config, section), name, value)
    if config.engine.cuda_graph:
        fail("engine.cuda_graph", "online runs start again (and draw their new keys) on the host; the CUDA graph "
             "covers episodic training only", cause="online.runs")


def check_values(config, source) -> None:
    """Impossible values and contradictions, each reported against the key that caused it."""

    def fail(key: str, message: str, cause: str | None = None) -> typing.NoReturn:
        # A value that is missing (still the default) is blamed on the setting that needs it.
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        where = source(key) if cause is None or source(key) != "default" else source(cause)
        raise ConfigError(f"{where}: {key} = {value!r}: {message}")

    def at_least(key: str, low: float) -> None:
        section, name = key.split(".")
        if getattr(getattr(config, section), name) < low:
            fail(key, f"must be >= {low}")

    def positive(key: str) -> None:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if not (value > 0 and math.isfinite(value)):
            fail(key, "must be > 0")

    def interval(key: str) -> None:
        section, name = key.split(".")
        value = getattr(getattr(config, section), name)
        if len(value) != 2 or not value[0] <= value[1]:
            fail(key, "must be [low, high] with low <= high")

    inner, train, task = config.inner, config.train, config.task
    if not config.run.dir.strip():
        # An empty path is the current directory to the OS: a run would land in the caller's files.
        fail("run.dir", "must name a directory (. for the current one)")
    _check_online(config, fail, at_least, source)
    at_least("inner.steps", 0)
    positive("inner.lr")
    _check_inner(config, fail, at_least)
    if inner.checkpoint == "segments" and inner.checkpoint_segment is None:
        fail("inner.checkpoint_segment", "inner.checkpoint=segments needs a segment length",
             cause="inner.checkpoint")
    if inner.checkpoint_segment is not None and inner.checkpoint_segment < 1:
        fail("inner.checkpoint_segment", "must be >= 1")
    _check_problem(config, fail)
    if len(config.train.betas) != 2 or not all(0 <= beta < 1 for beta in config.train.betas):
        fail("train.betas", "must be two numbers in [0, 1)")
    if not config.inner.mode.strip():
        fail("inner.mode", "must name a hypergradient method")
    # implicit.*, neumann.*, finite_difference.* and inner.truncate are checked by the methods that own
    # them (distmaml.meta.methods), each section whichever method the run uses, when build_inner builds them.
    at_least("train.iterations", 0)
    at_least("train.meta_batch", 1)
    positive("train.lr")
    at_least("train.lr_min", 0)
    if train.lr_min > train.lr:
        fail("train.lr_min", f"must be <= train.lr ({train.lr})", cause="train.lr")
    at_least("train.grad_clip", 0)
    at_least("train.log_every", 1)
    at_least("train.checkpoint_every", 0)
    at_least("train.keep_checkpoints", 1)
    at_least("train.check_every", 0)
    at_least("train.time_limit", 0)
    at_least("train.max_meta_loss", 0)
    if 0 < train.max_meta_loss_factor <= 1:
        fail("train.max_meta_loss_factor", "must be 0 (off) or above 1: it bounds a rise")
    at_least("train.max_meta_loss_factor", 0)
    if 0 < train.max_grad_norm_factor <= 1:
        fail("train.max_grad_norm_factor", "must be 0 (off) or above 1: it bounds a rise")
    at_least("train.max_grad_norm_factor", 0)
    if any(not isinstance(prefix, str) or not prefix for prefix in train.allow_unreached):
        fail("train.allow_unreached", "must list non-empty names or name prefixes of phi's tensors")
    positive("dist.timeout")
    positive("logging.wandb_timeout")
    at_least("task.support", 1)
    at_least("task.query", 1)
    at_least("task.ways", 2)
    for key in ("task.amplitude", "task.phase", "task.x_range"):
        interval(key)
    if any(width < 1 for width in config.model.hidden):
        fail("model.hidden", "every width must be >= 1")
    at_least("model.channels", 1)
    if len(config.model.widths) != 4 or any(width < 1 for width in config.model.widths):
        fail("model.widths", "must be four widths >= 1")
    at_least("task.image_size", 8)
    if task.channels not in (1, 3):
        fail("task.channels", "must be 1 (grey) or 3 (RGB)")
    if not task.family.strip():
        fail("task.family", "must name a family")
    if not config.model.kind.strip():
        fail("model.kind", "must name a model")
    positive("model.init_std")
    at_least("engine.threads", 0)
    at_least("engine.memory_budget", 0)
    at_least("eval.diverged_factor", 1)
    if any(not (rate > 0 and math.isfinite(rate)) for rate in config.eval.lr_grid):
        fail("eval.lr_grid", "every rate must be a finite number > 0")
    at_least("eval.tasks", 2)
    at_least("eval.steps", 0)
    if config.eval.shots is not None and config.eval.shots < 1:
        fail("eval.shots", "must be >= 1")
    if config.eval.query is not None and config.eval.query < 1:
        fail("eval.query", "must be >= 1")
    if config.engine.device not in ("auto", "cpu", "cuda") and not config.engine.device.startswith("cuda:"):
        fail("engine.device", "must be auto, cpu, cuda or cuda:N")
    config.run.resume = _bool_words(config.run.resume)
    batched = _bool_words(config.engine.batched)
    if isinstance(batched, str):
        if batched.lower() != "auto":
            fail("engine.batched", "must be true, false or auto")
        batched = "auto"
    config.engine.batched = batched
    if config.online.runs and batched is not True:
        # The per-task loop (distmaml.meta.reference) starts a task's rule state afresh at step 0; a
        # persistent run carries its own (momentum, Adam's moments and count).
        fail("engine.batched", "online runs take the batched path: the per-task loop starts every run's rule state "
             "afresh", cause="online.runs")


def _bool_words(value):
    """"true" or "false" given as text (a quoted YAML value, an override) as the bool it names; any
    other value as it is."""
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    return value
