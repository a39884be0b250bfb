"""Meta-training: the outer loop of MAML, composed from the pieces that own each idea.

Launch it any of these ways (the same entry point everywhere; see README.md):

    distmaml train configs/sine_maml.yaml                        # one process, CPU or one GPU
    python -m distmaml train configs/sine_maml.yaml inner.steps=5
    torchrun --nproc_per_node 8 -m distmaml train configs/sine_maml.yaml
    accelerate launch --multi_gpu --num_processes 8 -m distmaml train configs/sine_maml.yaml
    sbatch slurm/train_single_node.sbatch configs/sine_maml.yaml

One meta-iteration: this rank builds its shard of the meta-batch from (seed, iteration, index),
computes the sum of its tasks' meta-gradients, one all-reduce adds the shards up, and every rank
takes the same Adam step on the average, so the weights stay identical everywhere.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import yaml

from distmaml import checkpoint, dist
from distmaml.checkpoint import PreemptionWatch
from distmaml.config import Config, ConfigError, flatten, to_dict
from distmaml.evaluate import evaluate, evaluation_settings, query_metrics
from distmaml.log import NullLogger, RunLogger, setup_logging, write_json
from distmaml.engine import DTYPES, MetaStep, StepOutput, make_optimizer, set_learning_rate
from distmaml.meta import detached
from distmaml.models import build_model
from distmaml.tasks import build_task_family

log = logging.getLogger("distmaml.train")

# Settings that may differ between a checkpoint and the run that resumes it; any other difference
# would silently change the experiment, so resuming refuses it.
# Why training may stop early, in order of precedence: the signals of a preemption, then the time limit.
STOP_REASONS = (*PreemptionWatch.SIGNALS, "time_limit")

RESUMABLE_CHANGES = ("run.", "train.iterations", "train.log_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.check_every", "train.time_limit", "eval.", "logging.",
                     "engine.device", "engine.batched", "engine.cuda_graph", "data.root", "data.cache_dir")


def learning_rate(config: Config, iteration: int) -> float:
    """The outer learning rate at `iteration`: constant, or cosine from train.lr to train.lr_min."""
    train = config.train
    if train.lr_schedule == "constant" or train.iterations == 0:
        return train.lr
    return train.lr_min + (train.lr - train.lr_min) * 0.5 * (1 + math.cos(math.pi * iteration / train.iterations))


def train(config: Config) -> dict[str, Any]:
    """Meta-train as `config` says and return the summary (rank 0 also writes run.dir/summary.json).

    Joins and always leaves the process group the launcher set up (none for a plain process).
    """
    ctx = dist.init(config.engine.device)
    setup_logging(ctx.rank)
    try:
        return _train(config, ctx)
    finally:
        dist.teardown()


def _train(config: Config, ctx: dist.Context) -> dict[str, Any]:
    if config.engine.cuda_graph and ctx.device.type != "cuda":
        raise ConfigError(f"engine.cuda_graph = true: needs a CUDA device, this process has {ctx.device}")
    run_dir, train_cfg = Path(config.run.dir), config.train
    ckpt_dir = run_dir / "checkpoints"

    torch.manual_seed(train_cfg.seed)  # identical initial weights on every rank
    weight_dtype = DTYPES[config.engine.dtype][0]
    model = build_model(config).to(ctx.device, weight_dtype)
    params = dict(model.named_parameters())
    optimizer = make_optimizer(params.values(), train_cfg.lr, ctx.device)
    family = build_task_family(config, ctx.device, weight_dtype)

    start = _restore(config, ckpt_dir, model, optimizer)
    step = MetaStep(model, params, optimizer, family, config, ctx, stop_reasons=len(STOP_REASONS))
    logger = _make_logger(config, ctx, run_dir)
    logger.start(start, train_cfg.iterations)
    log.info("training %s from iteration %d to %d; %d process(es), tasks %d..%d of %d on this one (%s)",
             run_dir, start, train_cfg.iterations, ctx.world_size, step.tasks.start, step.tasks.stop - 1,
             train_cfg.meta_batch, ctx.device)
    try:
        return _loop(config, ctx, model, params, optimizer, family, step, logger, start)
    finally:
        logger.close()  # also when training fails: finish the progress bar and the wandb run


def _loop(config: Config, ctx: dist.Context, model, params, optimizer, family, step: MetaStep, logger,
          start: int) -> dict[str, Any]:
    """Meta-iterations from `start` until done, preempted or out of time; then evaluate and summarise."""
    run_dir, train_cfg = Path(config.run.dir), config.train
    ckpt_dir = run_dir / "checkpoints"

    def save(iteration: int) -> None:
        if any(not torch.isfinite(p).all() for p in params.values()):
            raise FloatingPointError(f"iteration {iteration}: weights are not finite; not overwriting "
                                     f"the checkpoints in {ckpt_dir}")
        if ctx.is_main:
            state = {"iteration": iteration, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "config": to_dict(config), "rng": checkpoint.rng_state()}
            checkpoint.save_checkpoint(ckpt_dir, state, keep=train_cfg.keep_checkpoints)
        dist.barrier(ctx)

    # Metrics stay on the device between log steps, so the host never waits for the GPU in between.
    window_loss = torch.zeros((), dtype=torch.float64, device=ctx.device)
    window_start, window_time = start, time.perf_counter()
    train_start = window_time
    iteration, status, reason = start, "complete", None
    with PreemptionWatch() as preemption:
        while iteration < train_cfg.iterations:
            set_learning_rate(optimizer, learning_rate(config, iteration))
            time_up = bool(train_cfg.time_limit) and time.perf_counter() - train_start > train_cfg.time_limit
            requests = (*(preemption.signum == signum for signum in PreemptionWatch.SIGNALS), time_up)
            out = step(iteration, requests)
            window_loss += out.result.task_losses.sum()
            iteration += 1

            logger.advance(iteration)
            if iteration % train_cfg.log_every == 0 or iteration == train_cfg.iterations:
                metrics = _metrics(model, params, out, family, config, ctx, window_loss,
                                   iteration - window_start, time.perf_counter() - window_time)
                metrics.update(iteration=iteration, lr=learning_rate(config, iteration - 1))
                if not math.isfinite(metrics["meta_loss"]):
                    raise FloatingPointError(f"iteration {iteration}: meta-loss is {metrics['meta_loss']} "
                                             f"(try a smaller inner.lr or train.lr); checkpoints in {ckpt_dir} "
                                             f"are from before it")
                logger.log(metrics)
                window_loss.zero_()
                window_start, window_time = iteration, time.perf_counter()
            if train_cfg.check_every and iteration % train_cfg.check_every == 0:
                dist.check_replicas(list(params.values()), ctx, iteration)
            # Reading the votes waits for the all-reduce; a lone process needs no vote.
            votes = out.stop_votes.tolist() if ctx.distributed else requests
            # Every rank names the same reason, also one that no signal reached itself.
            reason = next((name for name, count in zip(STOP_REASONS, votes) if count > 0), None)
            stopping = reason is not None
            if stopping or iteration == train_cfg.iterations or (
                    train_cfg.checkpoint_every and iteration % train_cfg.checkpoint_every == 0):
                save(iteration)
            if stopping:
                status = "time_limit" if reason == "time_limit" else "preempted"
                why = f"train.time_limit={train_cfg.time_limit:g} s" if status == "time_limit" else reason.name
                log.warning("stopped at iteration %d (%s); checkpoint saved in %s", iteration, why, ckpt_dir)
                break
        if iteration == start and start == train_cfg.iterations:
            log.info("nothing to do: the checkpoint is already at iteration %d", start)

    seconds = time.perf_counter() - train_start
    summary: dict[str, Any] = {"status": status, "iteration": iteration, "world_size": ctx.world_size,
                               "run_dir": str(run_dir), "train_seconds": seconds,
                               "seconds_per_iteration": seconds / max(iteration - start, 1),
                               "peak_memory_mb": dist.peak_memory_mb(ctx)}
    if status != "preempted" and config.eval.at_end and ctx.is_main:
        summary["eval"] = evaluate(model, params, family, **evaluation_settings(config))
        final = summary["eval"]["steps"]
        log.info("eval on %d fresh tasks: query loss %.4f before adaptation, %.4f after %d step(s)",
                 config.eval.tasks, final[0]["loss"], final[-1]["loss"], config.eval.steps)
    if ctx.is_main:
        write_json(run_dir / "summary.json", summary)
        logger.summary(summary)
    # Ranks leave together: a launcher that stops all tasks once one exits with an error status
    # (srun --kill-on-bad-exit, torchrun; a preempted run exits 128+signum) must not cut rank 0
    # short while it writes the summary.
    dist.barrier(ctx)
    if status == "preempted":
        summary["signal"] = int(reason)
    return summary


def _restore(config: Config, ckpt_dir: Path, model, optimizer) -> int:
    """Load the checkpoint run.resume asks for; return the iteration to start from."""
    resume = config.run.resume
    latest = checkpoint.latest_checkpoint(ckpt_dir)
    if resume is False:
        if latest is not None:
            raise ConfigError(f"run.resume = false: {ckpt_dir} already holds checkpoints (newest {latest.name}); "
                              f"use run.resume=auto to continue it or another run.dir")
        return 0
    if resume == "auto" or resume is True:
        if latest is None and resume is True:
            raise ConfigError(f"run.resume = true: no checkpoint in {ckpt_dir}")
        path = latest
    else:
        path = Path(resume)
    if path is None:
        return 0
    state = checkpoint.load_checkpoint(path)
    _check_compatible(config, state["config"], path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    checkpoint.set_rng_state(state["rng"])
    log.info("resuming from %s (iteration %d)", path, state["iteration"])
    return int(state["iteration"])


def _check_compatible(config: Config, saved: dict, path: Path) -> None:
    now = flatten(config)
    for key, value in flatten(Config()).items():
        section, name = key.split(".")
        before = saved.get(section, {}).get(name, value)
        if now[key] != before and not key.startswith(RESUMABLE_CHANGES):
            raise ConfigError(f"run.resume: {path} was trained with {key} = {before!r}, the config says "
                              f"{now[key]!r}; choose another run.dir or set {key}={before!r}")


def _make_logger(config: Config, ctx: dist.Context, run_dir: Path):
    if not ctx.is_main:
        return NullLogger()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(config), sort_keys=False))
    lg = config.logging
    return RunLogger(run_dir, to_dict(config), progress=lg.progress, wandb=lg.wandb, wandb_project=lg.wandb_project,
                     wandb_name=lg.wandb_name, wandb_mode=lg.wandb_mode)


def _metrics(model, params, out: StepOutput, family, config: Config, ctx: dist.Context,
             window_loss: torch.Tensor, window_iterations: int, seconds: float) -> dict[str, Any]:
    """Metrics of the log window, summed over ranks in one all-reduce and averaged over tasks."""
    batch, result = out.batch, out.result
    before = query_metrics(model, detached(params), False, batch.query_x, batch.query_y, family)
    if result.adapted is not None:
        after = query_metrics(model, result.adapted, True, batch.query_x, batch.query_y, family)
    else:
        after = {"loss": result.task_losses}
    sums = {"meta_loss": window_loss / max(window_iterations, 1), "query_loss_before": before["loss"].sum(),
            "query_loss_after": after["loss"].sum()}
    if family.is_classification:
        sums["query_accuracy_before"] = before["accuracy"].sum()
        if "accuracy" in after:
            sums["query_accuracy_after"] = after["accuracy"].sum()
    for name, value in result.stats.items():
        sums[name] = value.sum()
    reduced = dist.all_reduce_sum([v.to(torch.float64).reshape(()) for v in sums.values()], ctx)
    metrics = {name: value.item() / config.train.meta_batch for name, value in zip(sums, reduced)}
    metrics["grad_norm"] = out.grad_norm.item()
    metrics["tasks_per_s"] = config.train.meta_batch * window_iterations / max(seconds, 1e-9)
    metrics["s_per_iteration"] = seconds / max(window_iterations, 1)
    return metrics
