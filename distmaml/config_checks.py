"""Impossible values and contradictions in a loaded configuration, each reported against its key.

config.from_flat runs `check_values` on every configuration it builds. Checks that need the
data or the model (an Omniglot character's 20 drawings, an inner.adapt prefix that matches no
weight) are made where those are built, in the same one-line form.
"""

from __future__ import annotations

import math
import typing

from distmaml.errors import ConfigError


def _check_inner(config, fail, at_least, positive) -> None:
    """The inner rule's settings and the combinations of rule and mode that cannot work."""
    inner = config.inner
    if inner.rule == "momentum" and inner.momentum is None:
        fail("inner.momentum", "inner.rule = momentum needs inner.momentum (a coefficient in [0, 1), e.g. 0.9)",
             cause="inner.rule")
    if inner.momentum is not None and not 0 <= inner.momentum < 1:
        fail("inner.momentum", "must be in [0, 1)")
    if len(inner.betas) != 2 or not all(0 <= beta < 1 for beta in inner.betas):
        fail("inner.betas", "must be two numbers in [0, 1)")
    positive("inner.eps")
    if any(not isinstance(prefix, str) or not prefix for prefix in inner.adapt):
        fail("inner.adapt", "must list non-empty name prefixes")
    at_least("inner.multi_step_anneal", 0)
    at_least("inner.first_order_iterations", 0)
    if inner.mode == "implicit" and inner.rule != "sgd":
        fail("inner.rule", "implicit mode takes plain SGD steps: its gradient formula assumes the solution of the "
             "regularised inner problem, not the path of another rule", cause="inner.mode")
    if inner.mode == "implicit" and inner.adapt:
        fail("inner.adapt", "implicit mode adapts every weight (its gradient formula has no term for weights "
             "the inner loop holds fixed)", cause="inner.mode")
    if inner.mode == "reptile" and inner.rule in ("meta_sgd", "lslr"):
        fail("inner.rule", "Reptile's meta-gradient theta - phi_K gives learned step sizes no gradient",
             cause="inner.mode")
    if inner.multi_step_loss and inner.mode in ("implicit", "reptile"):
        fail("inner.multi_step_loss", f"needs a mode that differentiates the unroll, not {inner.mode}",
             cause="inner.mode")
    if inner.first_order_iterations and inner.mode not in ("second_order", "truncated"):
        fail("inner.first_order_iterations", "anneals from first order to second_order or truncated mode, not "
             f"{inner.mode}", cause="inner.mode")


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
    at_least("inner.steps", 0)
    positive("inner.lr")
    _check_inner(config, fail, at_least, positive)
    if inner.mode == "truncated" and not 0 <= inner.truncate <= inner.steps:
        fail("inner.truncate", f"must be between 0 and inner.steps ({inner.steps})", cause="inner.steps")
    if inner.checkpoint == "segments" and inner.checkpoint_segment is None:
        fail("inner.checkpoint_segment", "inner.checkpoint=segments needs a segment length",
             cause="inner.checkpoint")
    if inner.checkpoint_segment is not None and inner.checkpoint_segment < 1:
        fail("inner.checkpoint_segment", "must be >= 1")
    positive("implicit.lam")
    at_least("implicit.cg_steps", 1)
    at_least("implicit.cg_damping", 0)
    at_least("implicit.cg_tol", 0)
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
    at_least("eval.tasks", 2)
    at_least("eval.steps", 0)
    if config.eval.shots is not None and config.eval.shots < 1:
        fail("eval.shots", "must be >= 1")
    if config.eval.query is not None and config.eval.query < 1:
        fail("eval.query", "must be >= 1")
    if config.engine.device not in ("auto", "cpu", "cuda") and not config.engine.device.startswith("cuda:"):
        fail("engine.device", "must be auto, cpu, cuda or cuda:N")
    if isinstance(config.run.resume, str) and config.run.resume.lower() in ("true", "false"):
        config.run.resume = config.run.resume.lower() == "true"
