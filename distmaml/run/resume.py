"""Where a run goes on from: the newest usable checkpoint of its run directory, restored into the
learner and the optimizer, after checking that it was trained under the same experiment."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, NamedTuple

import torch

from distmaml.build import Learner
from distmaml.config import Config, ConfigError, flatten, from_dict, source_of
from distmaml.engine import dist
from distmaml.engine.step import fit_optimizer_to, learning_rate
from distmaml.imports import absolute_specs, check_user_files, file_of, spec_values
from distmaml.run import checkpoint
from distmaml.run.restore import restore
from distmaml.run.run_dir import refuse_finished_without_checkpoint

log = logging.getLogger("distmaml.train")

# Settings that may differ between a checkpoint and the run that resumes it; any other difference
# would silently change the experiment, so resuming refuses it.
RESUMABLE_CHANGES = ("run.", "train.iterations", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.check_every", "train.time_limit", "train.max_meta_loss",
                     "train.max_meta_loss_factor", "train.max_grad_norm_factor", "train.allow_unreached",
                     "eval.", "logging.", "engine.device", "engine.batched", "engine.cuda_graph", "engine.threads",
                     "engine.memory_check", "engine.memory_budget", "dist.", "data.root", "data.cache_dir",
                     "data.storage")
# Settings a user changes to go on from the last good checkpoint of a run that diverged: allowed, and
# said in one line, since they change how the run continues.
RECOVERY_CHANGES = ("train.lr", "train.lr_min", "train.grad_clip")



class Resumed(NamedTuple):
    iteration: int  # where training goes on from (0: a fresh start)
    # The first logged window's median meta-loss, {"meta_loss": x, "first": i, "last": j}, that
    # train.max_meta_loss_factor is relative to; None until a window was logged.
    reference: dict | None = None
    # Until then, the meta-losses of that window so far (a checkpoint written before the first log
    # step: a preemption, or checkpoint_every below log_every), so that the window goes on where it was.
    first_window: torch.Tensor | None = None
    # train.max_grad_norm_factor's bound on the meta-gradient's norm, and the norms of the logging
    # window the checkpoint was written in (the next window's bound is their median).
    grad_norm_bound: float = math.inf
    window_grad_norms: torch.Tensor | None = None
    # The path engine.batched = auto chose (True: batched), so that the run goes on with it; None
    # where the checkpoint recorded none (a fresh start, or one written before the choice existed).
    batched: bool | None = None
    # Online: every persistent run's state, by global run index (distmaml.engine.schedule); None episodic.
    online: dict | None = None


def restore_run(config: Config, ctx: dist.Context, learner: Learner, optimizer) -> Resumed:
    """Load the checkpoint run.resume asks for; return where to start from."""
    resume, run_dir = config.run.resume, Path(config.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    if resume is False:
        return Resumed(0)  # starting over: the main process moved an earlier run aside (run_dir.claim)
    if resume == "auto" or resume is True:
        # The main process moves unusable newest checkpoints aside, so that nothing counts them again.
        latest = checkpoint.latest_checkpoint(ckpt_dir, move_aside=ctx.is_main)
        if latest is None and resume is True:
            raise ConfigError(f"run.resume = true: no checkpoint in {ckpt_dir}")
        path = latest
    else:
        path = Path(resume)
    if path is None:
        if ctx.is_main:
            refuse_finished_without_checkpoint(run_dir)
        return Resumed(0)
    state = checkpoint.load_checkpoint(path)
    _check_compatible(config, state["config"], path, state["iteration"])
    if config.run.user_code != "any":
        check_user_files(state.get("user_files", {}), str(path), config)
    if state["iteration"] > config.train.iterations:
        raise ConfigError(f"{source_of(config, 'train.iterations')}: train.iterations = {config.train.iterations}: "
                          f"below iteration {state['iteration']}, where {path} already is; give train.iterations >= "
                          f"{state['iteration']} to go on, or another run.dir")
    if not (resume == "auto" or resume is True) and ctx.is_main:
        _supersede(ckpt_dir, int(state["iteration"]), path)
    restore(learner, state, path)
    checkpoint.load_weights(optimizer, state["optimizer"], path)
    fit_optimizer_to(optimizer, ctx.device)
    checkpoint.set_rng_state(state["rng"])
    log.info("resuming from %s (iteration %d)", path, state["iteration"])
    reference = _first_window(state.get("meta_loss_reference"))
    partial = state.get("first_window_losses")
    usable = reference is None and torch.is_tensor(partial) and partial.dim() == 1
    norms = state.get("window_grad_norms")  # absent from checkpoints written before the bound existed
    bound = state.get("grad_norm_bound")
    batched = state.get("batched")
    return Resumed(int(state["iteration"]), reference, partial if usable else None,
                   float(bound) if isinstance(bound, float) and bound > 0 else math.inf,
                   norms if torch.is_tensor(norms) and norms.dim() == 1 else None,
                   batched if isinstance(batched, bool) else None, state.get("online"))


def check_resumed_code(config: Config) -> None:
    """Before anything imports a user's file (the build): the checkpoint a resume will go on from was
    written by the files the config names, as they are now (run.user_code=any runs them as they are).
    Reads only; a checkpoint that cannot be used is restore_run's to report."""
    if config.run.user_code == "any" or config.run.resume is False:
        return
    if not any(file_of(value) for value in spec_values(config).values()):
        return  # no user file to compare
    ckpt_dir = Path(config.run.dir) / "checkpoints"
    path = (checkpoint.latest_checkpoint(ckpt_dir) if config.run.resume in ("auto", True)
            else Path(config.run.resume))
    try:
        state = checkpoint.load_checkpoint(path) if path is not None else None
    except checkpoint.CheckpointError:
        return
    if state is not None:
        check_user_files(state.get("user_files", {}), str(path), config)


def _supersede(ckpt_dir: Path, iteration: int, chosen: Path) -> None:
    """Going on from an older checkpoint than the run directory's newest: the newer ones belong to the
    abandoned continuation, and a later automatic resume must not pick them up. Moved aside (renamed
    *.superseded), never deleted."""
    for path in checkpoint.list_checkpoints(ckpt_dir):
        if checkpoint.checkpoint_iteration(path) <= iteration or path.resolve() == chosen.resolve():
            continue
        checkpoint.set_aside(path, "superseded", f"run.resume = {chosen}: the newer {path.name} belongs to the "
                             "continuation it replaces, and a later resume would continue from it")


def _first_window(saved: Any) -> dict | None:
    """A checkpoint's first-window meta-loss, if it holds a usable one (older checkpoints hold none)."""
    try:
        reference = {"meta_loss": float(saved["meta_loss"]), "first": int(saved["first"]), "last": int(saved["last"])}
    except (TypeError, KeyError, ValueError):
        return None
    return reference if math.isfinite(reference["meta_loss"]) else None


def _check_compatible(config: Config, saved: dict, path: Path, iteration: int) -> None:
    # The saved settings as that run ran them: an earlier version's config migrated, its missing keys
    # at their defaults (or at what the run did before the key existed).
    # A checkpoint from before import specs were made absolute holds the relative path it ran.
    now, ran = flatten(config), absolute_specs(flatten(from_dict(saved, str(path))))
    for key, before in ran.items():
        if now[key] == before or key.startswith(RESUMABLE_CHANGES):
            continue
        if key in RECOVERY_CHANGES:
            log.warning("run.resume: %s was trained with %s = %r; it continues with %r", path, key, before, now[key])
            continue
        raise ConfigError(f"run.resume: {path} was trained with {key} = {before!r}, the config says "
                          f"{now[key]!r}; choose another run.dir or set {key}={before!r}")
    before = saved.get("train", {}).get("iterations", config.train.iterations)
    if config.train.lr_schedule == "cosine" and before != config.train.iterations:
        # The cosine schedule is a function of train.iterations: stretching the run moves it.
        log.warning("run.resume: train.iterations changed from %d to %d under the cosine schedule: the learning "
                    "rate at iteration %d moves from %.3g to %.3g", before, config.train.iterations, iteration,
                    learning_rate(config, iteration, before), learning_rate(config, iteration))
