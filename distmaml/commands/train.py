"""Meta-training: the outer loop of MAML, composed from the pieces that own each idea.

Launch it any of these ways (the same entry point everywhere; see docs/manual.md):

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

import contextlib
import dataclasses
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils._pytree import tree_flatten

from distmaml.build import DTYPES, Learner, build
from distmaml.config import Config, ConfigError, config_file, sourced, to_dict
from distmaml.engine import dist, preflight
from distmaml.engine.step import MetaStep, StepOutput, Unreached, learning_rate, make_optimizer, set_learning_rate
from distmaml.errors import SettingError, TrainingError
from distmaml.evaluate import (divergence_warning, diverged_evaluation, evaluate, evaluation_settings, final_line,
                               task_metrics)
from distmaml.files import write_text
from distmaml.imports import user_files
from distmaml.meta import num_tasks, start_weights
from distmaml.meta.hessian import top_eigenvalue
from distmaml.rng import STREAM_TRAIN
from distmaml.run import checkpoint
from distmaml.run.log import NullLogger, RunLogger, setup_logging, write_json
from distmaml.run.restore import checkpoint_state
from distmaml.run.resume import Resumed, check_resumed_code, restore_run
from distmaml.run.run_dir import Before, RunLock, check_claimable, claim
from distmaml.run.signals import PreemptionWatch
from distmaml.run.watch import RunWatch
from distmaml.tasks import build_task_family

log = logging.getLogger("distmaml.train")

# From this many inner steps on, the progress bar also shows the inner steps of each outer step.
INNER_BAR_STEPS = 100

# Why training may stop early, in order of precedence: the signals of a preemption, Ctrl-C or a
# closed terminal, then the time limit.
STOP_REASONS = (*PreemptionWatch.SIGNALS, "time_limit")

def train(config: Config) -> dict[str, Any]:
    """Meta-train as `config` says and return the summary (rank 0 also writes run.dir/summary.json).

    summary["status"]: complete, time_limit, preempted (summary["signal"] says which) or diverged
    (in training, or in the evaluation at the end: summary["error"] says where).
    Joins the process group the launcher set up (none for a plain process) and, once the run
    succeeded, leaves it with every other rank; a failing rank raises without waiting for the others.
    """
    # Signals are watched from before the process group starts its threads, so that they all leave
    # the signals to the watch (a signal from the start-up on stops training after one iteration).
    with PreemptionWatch() as preemption:
        ctx = dist.init(config.engine.device, timeout_s=config.dist.timeout, threads=config.engine.threads)
        setup_logging(ctx.rank)
        try:
            summary = _train(config, ctx, preemption)
        except Exception as err:
            raise dist.collective_error(err, ctx, config.dist.timeout) or err
        dist.teardown()
    return summary


def _train(config: Config, ctx: dist.Context, preemption: PreemptionWatch) -> dict[str, Any]:
    before = Before(config.run.dir) if ctx.is_main else None
    trained: list[int] = []  # the iterations this process completed (the first one is enough to know)
    try:
        return _run(config, ctx, preemption, trained)
    except Exception as err:
        if before is not None and not trained:  # refused before its first iteration: it leaves nothing behind
            before.restore()
        if isinstance(err, Unreached):
            raise preflight.unreached_error(config, err.names, err.cause) from None
        raise


def _run(config: Config, ctx: dist.Context, preemption: PreemptionWatch, trained: list[int]) -> dict[str, Any]:
    with contextlib.ExitStack() as stack:
        resumed, learner, optimizer = dist.on_every_rank(ctx, lambda: _start(config, ctx, stack))
        start = resumed.iteration
        # Every rank restored on its own: they must have found the same checkpoint (run.dir on a
        # file system all ranks share), or their weights would part silently.
        dist.same_on_every_rank(start, ctx, "the iteration it resumes from", hint="every rank must see the same "
                                "run.dir (a file system shared by all nodes)")
        dist.check_replicas(list(learner.theta.values()), ctx, start)
        batched = preflight.choose_path(config, ctx, learner, resumed.batched)
        step = MetaStep(learner, optimizer, config, ctx, stop_reasons=len(STOP_REASONS), batched=batched)
        step.check_reachable = start == 0
        logger = stack.enter_context(contextlib.closing(_make_logger(config, ctx)))
        logger.start(start, config.train.iterations)
        if config.inner.steps >= INNER_BAR_STEPS:  # one outer step takes seconds: show its inner steps too
            step.show_inner_progress(logger.inner_progress(config.inner.steps))
        log.info("training %s from iteration %d to %d; %d process(es), tasks %d..%d of %d on this one (%s, "
                 "%d CPU thread(s))", config.run.dir, start, config.train.iterations, ctx.world_size,
                 step.tasks.start, step.tasks.stop - 1, config.train.meta_batch, ctx.device, torch.get_num_threads())
        return _loop(config, ctx, learner, optimizer, step, logger, resumed, preemption, trained)


def _start(config: Config, ctx: dist.Context, stack: contextlib.ExitStack) -> tuple[Resumed, Learner, Any]:
    """Everything before the first iteration that can fail on one rank: lock, checks, build, restore."""
    if config.engine.cuda_graph and ctx.device.type != "cuda":
        raise ConfigError(f"engine.cuda_graph = true: needs a CUDA device, this process has {ctx.device}")
    # Every check that can refuse the run comes before the run directory is touched, so that a
    # refused run leaves nothing on disk; the directory's own refusals come first of all.
    lock = None
    if ctx.is_main:
        check_claimable(config.run.dir, config.run.resume, config_file(config))
        if os.path.isdir(config.run.dir):  # a second trainer is refused before any work: the lock writes nothing
            lock = stack.enter_context(RunLock(config.run.dir))
    check_resumed_code(config)  # before the build imports a user's file that changed since the checkpoint
    family = build_task_family(config, ctx.device, DTYPES[config.engine.dtype][0])
    try:  # a refusal names the setting and where it came from (the config file, the command line)
        shapes = preflight.shapes_only(config, family) if config.engine.memory_check else None
        if shapes is not None:  # nothing allocated for real before the estimate passed
            preflight.check_shapes(config, shapes)
            checkpointing = preflight.check_memory(config, ctx, shapes)
        torch.manual_seed(config.train.seed)  # identical initial weights on every rank
        learner = build(config, ctx.device, family)
        if shapes is None:  # built from values: estimated now, still before a real task is sampled
            checkpointing = preflight.check_memory(config, ctx, learner)
        # inner.checkpoint = auto, as the estimate chose it: the same bits either way, only time and memory differ.
        learner = learner._replace(inner=dataclasses.replace(learner.inner, checkpoint=checkpointing))
        preflight.check_first_batch(config, learner)
    except SettingError as err:
        raise sourced(config, err) from None
    if ctx.is_main:  # one trainer per run directory; the other ranks only read it
        lock = lock or stack.enter_context(RunLock(config.run.dir))
        claim(config.run.dir, config.run.resume, config_file(config))
        lock.write_pid()
    optimizer = make_optimizer(learner.theta.values(), config.train.lr, ctx.device, tuple(config.train.betas))
    return restore_run(config, ctx, learner, optimizer), learner, optimizer


def _loop(config: Config, ctx: dist.Context, learner: Learner, optimizer, step: MetaStep, logger,
          resumed: Resumed, preemption: PreemptionWatch, trained: list[int]) -> dict[str, Any]:
    """Meta-iterations from where `resumed` says until done, preempted, out of time or diverged; then
    evaluate and summarise."""
    run_dir, train_cfg = Path(config.run.dir), config.train
    ckpt_dir = run_dir / "checkpoints"
    params = learner.theta
    start = resumed.iteration
    watch = RunWatch(config, step, resumed, ctx.device)

    def save(iteration: int) -> None:
        if any(not torch.isfinite(p).all() for p in params.values()):  # a last guard; divergence is flagged first
            raise TrainingError(f"iteration {iteration}: weights are not finite; not writing a checkpoint over "
                                f"the good ones in {ckpt_dir}")
        runs = step.schedule.state_dict(ctx)  # online: every rank's runs, gathered (a collective)
        if ctx.is_main:
            state = {"iteration": iteration, **checkpoint_state(learner), "optimizer": optimizer.state_dict(),
                     "config": to_dict(config), "user_files": user_files(config), "rng": checkpoint.rng_state(),
                     "batched": step.batched, **watch.checkpoint_fields(), **({"online": runs} if runs else {})}
            checkpoint.save_checkpoint(ckpt_dir, state, keep=train_cfg.keep_checkpoints)
        dist.barrier(ctx)

    # Divergence is flagged on the device every iteration; the host looks where it costs nothing
    # (a CPU, or a distributed run that syncs for its stop votes anyway), else at log and
    # checkpoint steps and at the end, and always before a checkpoint is written.
    look_every_iteration = ctx.device.type == "cpu" or ctx.distributed
    train_start = time.perf_counter()
    iteration, status, reason, diverged_at = start, "complete", None, -1
    step.schedule.load_state_dict(resumed.online)
    reset_error = None  # online: why too many runs started again for a non-finite state
    with dist.Watchdog(ctx, config.dist.timeout) as watchdog:
        while iteration < train_cfg.iterations:
            set_learning_rate(optimizer, learning_rate(config, iteration))
            time_up = bool(train_cfg.time_limit) and time.perf_counter() - train_start > train_cfg.time_limit
            requests = (*(preemption.signum == signum for signum in PreemptionWatch.SIGNALS), time_up)
            out = step(iteration, requests)
            if not trained:
                trained.append(iteration)
            watch.record(out)
            iteration += 1
            watchdog.beat(iteration)
            logger.advance(iteration)
            log_now = iteration % train_cfg.log_every == 0 or iteration == train_cfg.iterations
            save_now = iteration == train_cfg.iterations or (
                bool(train_cfg.checkpoint_every) and iteration % train_cfg.checkpoint_every == 0)
            # Reading the votes waits for the all-reduce; a lone process needs no vote.
            votes = out.stop_votes.tolist() if ctx.distributed else requests
            # Every rank names the same reason, also one that no signal reached itself.
            reason = next((name for name, count in zip(STOP_REASONS, votes) if count > 0), None)
            if look_every_iteration or log_now or save_now or reason is not None:
                diverged_at = int(step.diverged_at)
                if diverged_at >= 0:
                    status = "diverged"
                    break
            if log_now:
                metrics = _metrics(learner, out, config, ctx, step.batched, *watch.window(iteration))
                metrics.update(iteration=iteration, lr=learning_rate(config, iteration - 1))
                resets, reset_error = watch.resets(iteration)
                if config.online.runs:  # runs left out and started again in the window, for a non-finite state
                    metrics["runs_not_finite"] = resets
                logger.log(metrics)
                watch.close_window(iteration, params, lambda: _sharpness_warning(config, learner, metrics))
                if reset_error:
                    status, diverged_at = "diverged", iteration - 1
                    break
            if train_cfg.check_every and iteration % train_cfg.check_every == 0:
                dist.check_replicas(list(params.values()), ctx, iteration)
            if save_now or reason is not None:
                save(iteration)
            if reason is not None:
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
                               "peak_memory_mb": dist.peak_memory_mb(ctx), "batched": step.batched}
    online = step.schedule.summary(ctx) if status != "diverged" else None  # a collective: every rank
    if online is not None:
        summary["online"] = online
    if status == "diverged":  # the CLI prints summary["error"]
        summary.update(_divergence(config, learner, ckpt_dir, diverged_at, step.diverged_loss.item(), watch.reference,
                                   step.diverged_norm.item(), out.result.stats, reset_error))
    if status in ("complete", "time_limit") and config.eval.at_end and ctx.is_main:
        summary["eval"] = evaluate(learner.problem, params, learner.family, learner.inner,
                                   **evaluation_settings(config))
        log.info(final_line(summary["eval"]))
        warnings = [line for line in (summary["eval"].get("beyond_trained_steps"), divergence_warning(summary["eval"]))
                    if line]
        for warning in warnings:
            log.warning("eval: %s", warning)
        if warnings:
            summary["warnings"] = [f"eval: {warning}" for warning in warnings]
        failed = diverged_evaluation(summary["eval"])
        if failed:  # a model that cannot adapt is no result, however its training loss went
            good = checkpoint.latest_checkpoint(ckpt_dir)
            summary.update(status="diverged", error=f"{failed}: the model trained to iteration {iteration} ({good}) "
                           "does not adapt stably; distmaml eval with fewer --steps shows how far it holds")
    if ctx.is_main:
        write_json(run_dir / "summary.json", summary)
        logger.summary(summary)
    # Ranks leave together: a launcher that stops all tasks once one exits with an error status
    # (srun --kill-on-bad-exit, torchrun; a preempted run exits 128+signum) must not cut rank 0
    # short while it evaluates and writes the summary, however long that takes.
    dist.wait_for_main(ctx)
    if status == "preempted":
        summary["signal"] = int(reason)
    return summary


def _divergence(config: Config, learner: Learner, ckpt_dir: Path, diverged_at: int, loss: float,
                reference: dict | None, norm: float, stats: dict[str, torch.Tensor],
                resets: str | None = None) -> dict[str, Any]:
    """The summary's account of a diverged run: where and why it diverged, and where to go back to;
    `resets` says why, where it was online runs that kept failing (RunWatch.resets)."""
    # The last good checkpoint precedes the iteration whose meta-loss or meta-gradient ran away:
    # one written after it (a GPU looks for divergence only at log and checkpoint steps) holds
    # weights already moved by the runaway steps.
    good = checkpoint.latest_checkpoint(ckpt_dir, at_most=diverged_at)
    where = (f"the last good checkpoint is {good} (iteration {checkpoint.checkpoint_iteration(good)})" if good
             else "no checkpoint was written before it")
    train = config.train
    fix = "with a smaller train.lr, or train.grad_clip"
    # A method that can tell its own setting is at fault (a Neumann series whose terms grow) says so.
    cause = getattr(learner.inner.method, "divergence_cause", lambda stats: None)(stats)
    if cause:
        fix = cause
    if resets:  # the runs themselves ran away, one after another
        fix = "with a smaller inner.lr, train.lr or online.unroll the runs stay finite"
    hint = (f"starting again resumes from it: {fix}" if good else
            f"run.resume=false starts over, moving this run's files aside: {fix}")
    if resets:
        why = resets
    elif not math.isfinite(loss):
        why = "the meta-loss or meta-gradient was not finite"
        bad_data = _non_finite_data(learner, diverged_at, train.meta_batch)
        if bad_data:
            why, hint = bad_data, "the data is at fault, not the learning rate"
    elif train.max_meta_loss and loss > train.max_meta_loss:
        why = f"the meta-loss {loss:.4g} was above train.max_meta_loss = {train.max_meta_loss:g}"
    elif reference and train.max_meta_loss_factor and loss > train.max_meta_loss_factor * abs(reference["meta_loss"]):
        why = (f"the meta-loss {loss:.4g} was above train.max_meta_loss_factor = {train.max_meta_loss_factor:g} times "
               f"its median over the first logged window, {reference['meta_loss']:.4g} (iterations "
               f"{reference['first']}..{reference['last']})")
    elif math.isfinite(norm):
        why = (f"the meta-gradient's norm {norm:.4g} was above train.max_grad_norm_factor = "
               f"{train.max_grad_norm_factor:g} times its median over the previous logged window (within the first "
               "window, the median of its norms so far)")
    else:
        why = "the meta-gradient was not finite"
    error = (f"training diverged at iteration {diverged_at + 1}: {why}; stopped without writing a checkpoint; "
             f"{where} ({hint})")
    return {"diverged_at": diverged_at + 1, "last_good_checkpoint": str(good) if good else None, "error": error}


def _non_finite_data(learner: Learner, iteration: int, meta_batch: int) -> str | None:
    """Whether the tasks of `iteration` themselves hold values that are not finite (they are a pure
    function of (seed, iteration, index), so sampling them again gives what training saw)."""
    device = next(learner.model.parameters()).device
    batch = learner.family.sample(STREAM_TRAIN, iteration, torch.arange(meta_batch, device=device))
    leaves = tree_flatten(batch)[0]
    names = getattr(batch, "_fields", None) or (list(batch) if isinstance(batch, dict) else range(len(leaves)))
    for name, leaf in zip(names, leaves):
        if torch.is_tensor(leaf) and leaf.is_floating_point() and not bool(torch.isfinite(leaf).all()):
            tasks = sorted({int(i) for i in torch.nonzero(~torch.isfinite(leaf))[:, 0].tolist()})
            return (f"the tasks of that iteration hold values that are not finite ({type(learner.family).__name__} "
                    f"gave {name} with NaN or infinite entries in task(s) {', '.join(map(str, tasks[:5]))}"
                    f"{', ...' if len(tasks) > 5 else ''})")
    return None


def _sharpness_warning(config: Config, learner: Learner, metrics: dict[str, Any]) -> str | None:
    """A warning when the inner loss at its start is too sharp for the rule's steps (where the rule
    knows its limit: 2 / lr for plain SGD)."""
    sharpness, limit = metrics.get("sharpness"), learner.inner.rule.curvature_limit()
    if sharpness is None or limit is None or sharpness <= limit:
        return None
    steps = config.inner.steps
    return (f"iteration {metrics['iteration']}: the inner loss at its start has curvature {sharpness:.0f} (top "
            f"Hessian eigenvalue, mean over tasks), above 2 / inner.lr = {limit:.0f}: plain inner steps at inner.lr "
            f"grow along it, which the {steps} step(s) of training absorb, but adapting with many more steps can "
            f"diverge. The final evaluation counts diverged tasks; to adapt with more steps than {steps}, train "
            "with them (inner.steps) or with a smaller inner.lr")


def _make_logger(config: Config, ctx: dist.Context):
    if not ctx.is_main:
        return NullLogger()
    run_dir = Path(config.run.dir)
    write_text(run_dir / "config.yaml", yaml.safe_dump(to_dict(config), sort_keys=False))
    lg = config.logging
    return RunLogger(run_dir, to_dict(config), progress=lg.progress, wandb=lg.wandb, wandb_project=lg.wandb_project,
                     wandb_name=lg.wandb_name, wandb_mode=lg.wandb_mode, wandb_timeout=lg.wandb_timeout)


def _metric_names(config: Config, learner: Learner, batched: bool) -> list[str]:
    """What the log step reduces: decided by the config, the problem and the path every rank agreed on
    alone, so that every rank -- one without tasks too -- sends the same buffer through the all-reduce."""
    outer = getattr(learner.problem, "outer_name", "outer")
    names = [f"{outer}_loss_before", f"{outer}_loss_after"]
    if learner.family.is_classification:
        # The per-task loop keeps no adapted weights to score.
        names += [f"{outer}_accuracy_before"] + ([f"{outer}_accuracy_after"] if batched else [])
    names += list(learner.inner.method.stat_names)
    return names + (["sharpness"] if config.logging.sharpness else [])


def _metrics(learner: Learner, out: StepOutput, config: Config, ctx: dist.Context, batched: bool, mean_loss: float,
             window_iterations: int, seconds: float) -> dict[str, Any]:
    """Metrics of the log window, summed over ranks in one all-reduce and averaged over tasks."""
    problem, (batch, result), theta = out.problem, out[:2], learner.theta
    outer = getattr(problem, "outer_name", "outer")
    names = _metric_names(config, learner, batched)
    first = next(learner.model.parameters())
    sums = {name: first.new_zeros((), dtype=torch.float64) for name in names}
    if num_tasks(batch):
        found = dict(result.stats)
        with torch.no_grad():
            before = task_metrics(problem, start_weights(problem, theta, batch), theta, batch)
        after = (task_metrics(problem, result.adapted, theta, batch) if result.adapted is not None
                 else {"loss": result.task_losses})
        for name, when in (("loss", before), ("accuracy", before)):
            found[f"{outer}_{name}_before"] = when.get(name)
        for name in ("loss", "accuracy"):
            found[f"{outer}_{name}_after"] = after.get(name)
        if config.logging.sharpness:
            found["sharpness"] = top_eigenvalue(problem, theta, batch)
        sums.update({name: found[name].sum().to(torch.float64) for name in names})
    reduced = dist.all_reduce_sum([value.reshape(()) for value in sums.values()], ctx)
    metrics = {"meta_loss": mean_loss}  # already over all ranks
    counted = max(config.train.meta_batch - float(out.excluded), 1)  # online: runs left out are not averaged
    metrics.update({name: value.item() / counted for name, value in zip(sums, reduced)})
    metrics["grad_norm"] = out.grad_norm.item()
    metrics["tasks_per_s"] = config.train.meta_batch * window_iterations / max(seconds, 1e-9)
    metrics["s_per_iteration"] = seconds / max(window_iterations, 1)
    return metrics
