"""The one module that knows about processes and devices.

It reads the launcher's environment (torchrun / accelerate launch: RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT; else SLURM's srun: SLURM_PROCID, SLURM_STEP_NUM_TASKS, SLURM_LOCALID and the
first host of the step's node list), joins the process group (NCCL on CUDA, gloo on CPU), and offers the few
collectives the trainer needs. With neither environment it is a single process with no group.

Why no DistributedDataParallel: DDP synchronises gradients from hooks on the first backward, which
does not see gradients of gradients (pytorch/pytorch#63929), and the meta-gradient is exactly such a
thing. Instead every rank computes the sum of its own tasks' meta-gradients and one explicit
all-reduce adds them up.
"""

from __future__ import annotations

import datetime
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Callable, Mapping, TypeVar

import torch
import torch.distributed as torch_dist

from distmaml.errors import ConfigError, DistmamlError, TrainingError

log = logging.getLogger(__name__)
T = TypeVar("T")
# The other ranks wait at the end while the main process evaluates, which may take longer than any
# collective should (dist.timeout). This group's barrier waits until the main process arrives; if
# it dies instead, its closed connections end the wait at once (and launchers stop every rank).
PATIENT = datetime.timedelta(days=7)
_PATIENT_GROUP = None


@dataclass(frozen=True)
class Context:
    """Where this process stands: its rank among `world_size`, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process writes files, prints progress and talks to wandb."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


@dataclass(frozen=True)
class LaunchEnv:
    """Rank layout read from the environment; None fields where the launcher gave none."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str | None
    master_port: str | None
    launcher: str


def read_launch_env(env: Mapping[str, str] = os.environ) -> LaunchEnv | None:
    """The rank layout set by torchrun/accelerate (preferred) or srun; None for a plain process."""
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR"), env.get("MASTER_PORT"), "torchrun")
    # Only an srun step sets SLURM_STEP_NUM_TASKS. The batch shell of a multi-task job also has
    # SLURM_PROCID=0 and SLURM_NTASKS>1, and a trainer started there directly must run alone rather
    # than wait forever for ranks that srun never started.
    if "SLURM_PROCID" in env and int(env.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        # Rank 0 runs on the first node of the step (srun places tasks in blocks, in node-list order).
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "localhost"
        # A port derived from the job id keeps two jobs that share a node from colliding.
        port = env.get("MASTER_PORT") or str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_STEP_NUM_TASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), env.get("MASTER_ADDR") or first_host(nodelist), port,
                         "srun")
    return None


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu[07-09,12],cpu3' -> 'gpu07'."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ValueError(f"cannot read a host from SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    if not ranges:
        return prefix
    return prefix + ranges.split(",")[0].split("-")[0]


def pick_device(preference: str, local_rank: int, key: str = "engine.device") -> torch.device:
    """engine.device (or the setting `key` names): 'auto' takes cuda:LOCAL_RANK when CUDA is present,
    else the CPU; a device this machine lacks is refused in one line."""
    if preference == "cpu" or (preference == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    use = f"{key} cpu" if key.startswith("--") else f"{key}=cpu or auto"
    if not torch.cuda.is_available():
        raise ConfigError(f"{key} = {preference!r}: this machine has no CUDA device (torch "
                          f"{torch.__version__}); use {use}")
    if preference.startswith("cuda:"):
        index = preference.partition(":")[2]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise ConfigError(f"{key} = {preference!r}: this machine has CUDA devices 0..{torch.cuda.device_count() - 1}")
        return torch.device(preference)
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def init(device_preference: str = "auto", timeout_s: float = 600.0, threads: int = 0) -> Context:
    """Join the process group the launcher describes (or none) and pick this rank's device.

    `threads` > 0 sets this process's CPU thread count (0 leaves PyTorch's default, one per core).
    Reductions split over threads add in another order, so bitwise-equal runs need equal counts.
    """
    if threads > 0:
        torch.set_num_threads(threads)
    launch = read_launch_env()
    if launch is None or launch.world_size == 1:
        return Context(device=pick_device(device_preference, 0))
    device = pick_device(device_preference, launch.local_rank)
    if launch.master_addr:
        os.environ.setdefault("MASTER_ADDR", launch.master_addr)
    if launch.master_port:
        os.environ.setdefault("MASTER_PORT", launch.master_port)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ConfigError(f"rank {launch.rank}: {launch.launcher} launch without {' and '.join(missing)} in the "
                          "environment")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch_dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo", init_method="env://",
                                  rank=launch.rank, world_size=launch.world_size,
                                  timeout=datetime.timedelta(seconds=timeout_s))
    global _PATIENT_GROUP
    _PATIENT_GROUP = torch_dist.new_group(backend="gloo", timeout=PATIENT)  # every rank creates it, in order
    log.info("rank %d/%d on %s (%s)", launch.rank, launch.world_size, device, launch.launcher)
    return Context(launch.rank, launch.world_size, launch.local_rank, device)


def teardown() -> None:
    """Leave the process group after every rank got here (safe to call always).

    The barrier first: destroying a group while a peer is still inside a collective can deadlock
    (torchtitan#1342), and exiting with gloo's worker threads still holding work aborts at
    interpreter shutdown ("terminate called without an active exception", pytorch#190489). Call it
    only once the run succeeded; a failing rank leaves without it (see cli).
    """
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


def on_every_rank(ctx: Context, action: Callable[[], T]) -> T:
    """action() on every rank, failing on every rank if it failed on any.

    Start-up work (loading data, locking the run directory, restoring a checkpoint, checking
    memory) can fail on one rank only; the others would then wait in their first collective until
    the timeout. One all-reduce of failure flags lets every rank stop at once: the failed rank
    raises its own error, the others say which rank failed.
    """
    failure: BaseException | None = None
    try:
        result = action()
    except Exception as err:  # noqa: BLE001 - re-raised below, on this rank and (as a flag) on the others
        failure = err
    if ctx.distributed:
        flags = torch.zeros(ctx.world_size, dtype=torch.float32, device=ctx.device)
        flags[ctx.rank] = float(failure is not None)
        torch_dist.all_reduce(flags)
        failed = [rank for rank, flag in enumerate(flags.tolist()) if flag]
    else:
        failed = [0] if failure is not None else []
    if failure is not None:
        raise failure
    if failed:
        raise TrainingError(f"rank(s) {failed} failed to start (their error is above); rank {ctx.rank} stops too")
    return result


def same_on_every_rank(value: int, ctx: Context, what: str, hint: str = "") -> None:
    """Raise on every rank unless every rank holds the same integer `value`."""
    if not ctx.distributed:
        return
    local = torch.tensor([value], dtype=torch.int64, device=ctx.device)
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    torch_dist.all_gather(gathered, local)
    values = [int(v) for v in gathered]
    if len(set(values)) > 1:
        raise TrainingError(f"the ranks disagree on {what} ({', '.join(f'rank {r}: {v}' for r, v in enumerate(values))})"
                            + (f"; {hint}" if hint else ""))


def collective_error(err: BaseException, ctx: Context, timeout_s: float) -> DistmamlError | None:
    """A one-line error for a collective that failed because a peer died, stopped or timed out."""
    backend_error = getattr(torch_dist, "DistBackendError", RuntimeError)
    if not ctx.distributed or isinstance(err, DistmamlError) or not isinstance(err, (backend_error, RuntimeError)):
        return None
    text = str(err)
    if not any(word in text.lower() for word in ("timed out", "timeout", "connection", "closed", "peer", "gloo",
                                                  "nccl")):
        return None
    first_line = text.strip().splitlines()[0][:200]
    return TrainingError(f"rank {ctx.rank}: a collective with the other ranks failed ({first_line}): a rank "
                         f"stopped, died or was slower than dist.timeout = {timeout_s:g} s")


class Watchdog:
    """Rank 0 says so, once per stall, when no iteration has finished for a while.

    A stopped (SIGSTOP) or very slow rank makes every other rank wait in the next collective,
    silently, until dist.timeout. The line appears after min(60 s, timeout / 4) without progress.
    A thread of its own, joined on exit; it only reads a timestamp the loop writes.
    """

    def __init__(self, ctx: Context, timeout_s: float):
        self.enabled = ctx.distributed and ctx.is_main
        self.timeout_s, self.patience = timeout_s, min(60.0, timeout_s / 4)
        self.iteration, self.last = 0, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="distmaml-watchdog", daemon=True)

    def beat(self, iteration: int) -> None:
        self.iteration, self.last = iteration, time.monotonic()

    def _watch(self) -> None:
        warned_at = None
        while not self._stop.wait(min(1.0, self.patience / 4)):
            waited = time.monotonic() - self.last
            if waited > self.patience and warned_at != self.last:
                warned_at = self.last
                log.warning("no iteration has finished for %.0f s (iteration %d): unless this rank's own "
                            "iterations are that slow, another rank is stopped or slow; the collective fails "
                            "after dist.timeout = %g s", waited, self.iteration + 1, self.timeout_s)

    def __enter__(self) -> "Watchdog":
        self.last = time.monotonic()
        if self.enabled:
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._stop.set()
            self._thread.join()


def shard(meta_batch: int, rank: int, world_size: int, group: int = 1) -> range:
    """Global task indices of `rank`: contiguous shards, the first B mod W ranks one task larger; with
    `group`, shards of whole groups of consecutive tasks (B a multiple of it), never split across ranks."""
    base, extra = divmod(meta_batch // group, world_size)
    start = rank * base + min(rank, extra)
    return range(group * start, group * (start + base + (rank < extra)))


def all_reduce_sum(tensors: list[torch.Tensor], ctx: Context) -> list[torch.Tensor]:
    """Element-wise sums over ranks of a list of tensors, in ONE all-reduce of one flat buffer.

    The models here have well under a million parameters (a few MB), far below the size where
    bucketing would let communication overlap computation, so one bucket is both simplest and
    fastest: a single latency instead of one per tensor.
    """
    if not ctx.distributed:
        return tensors
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch_dist.all_reduce(flat, op=torch_dist.ReduceOp.SUM)
    out, offset = [], 0
    for t in tensors:
        out.append(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()
    return out


def check_replicas(params: list[torch.Tensor], ctx: Context, iteration: int) -> None:
    """Fail loudly if any rank's weights differ from rank 0's (they must be bit-identical)."""
    if not ctx.distributed or not params:
        return
    flat = torch.cat([p.detach().reshape(-1).to(torch.float64) for p in params])
    # Two different weightings make an accidental match of diverged replicas vanishingly unlikely.
    weights = torch.arange(1, flat.numel() + 1, dtype=torch.float64, device=flat.device)
    checksum = torch.stack([flat.sum(), (flat * weights).sum()])
    gathered = [torch.empty_like(checksum) for _ in range(ctx.world_size)]
    torch_dist.all_gather(gathered, checksum)
    bad = [rank for rank, other in enumerate(gathered) if not torch.equal(other, gathered[0])]
    if bad:
        raise RuntimeError(f"iteration {iteration}: weights of rank(s) {bad} diverged from rank 0's "
                           f"(checksums {[g.tolist() for g in gathered]})")


def peak_memory_mb(ctx: Context) -> float:
    """Peak memory of this process so far: allocated CUDA memory on a GPU, else resident memory."""
    if ctx.device.type == "cuda":
        return torch.cuda.max_memory_allocated(ctx.device) / 2 ** 20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        torch_dist.barrier()


def wait_for_main(ctx: Context) -> None:
    """A barrier for ranks waiting on work only the main process does (the final evaluation)."""
    if ctx.distributed:
        torch_dist.barrier(group=_PATIENT_GROUP)
