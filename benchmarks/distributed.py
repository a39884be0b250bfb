"""A meta-iteration split into compute and its one all-reduce, for 1 and 2 processes (gloo on the CPU,
NCCL on GPUs), and the bytes one all-reduce carries for the real models.

    python -m benchmarks.distributed                   # sine, meta-batch 50, K = 5, worlds 1 and 2
    python -m benchmarks.distributed --inner-steps 1 --worlds 1 2 4

Each world size is a fresh `torchrun --standalone`. Every rank runs training's own MetaStep; the
engine's all-reduce (distmaml.engine.dist.all_reduce_sum, the one flat SUM of the meta-gradient, the stop
flags and the loss) is timed in place, after a barrier that separates waiting for the slowest rank
(imbalance and noise, not communication) from the collective itself. Rows are medians over
iterations of the slowest rank.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import MINIIMAGENET_SHAPED, OMNIGLOT_SHAPED, REPO, RESULTS, config_for, machine, write

SINE = REPO / "configs/sine_maml.yaml"


def worker(args) -> None:
    from distmaml.build import build
    from distmaml.commands.train import STOP_REASONS
    from distmaml.engine import dist
    from distmaml.engine.step import MetaStep, make_optimizer

    torch.set_num_threads(1)
    config = config_for(SINE, [f"train.meta_batch={args.meta_batch}", f"inner.steps={args.inner_steps}",
                               "engine.device=cpu"])
    ctx = dist.init("cpu")
    timings: list[list[float]] = []
    reduce = dist.all_reduce_sum

    def timed_all_reduce(tensors, context):
        waited = time.perf_counter()
        dist.barrier(context)
        started = time.perf_counter()
        out = reduce(tensors, context)
        timings.append([started - waited, time.perf_counter() - started])
        return out

    try:
        torch.manual_seed(0)
        learner = build(config, ctx.device)
        optimizer = make_optimizer(learner.theta.values(), config.train.lr, ctx.device)
        step = MetaStep(learner, optimizer, config, ctx, stop_reasons=len(STOP_REASONS))  # as training sends
        dist.all_reduce_sum = timed_all_reduce  # the engine's own collective, timed where it runs
        rows = []
        for iteration in range(args.warmup + args.iterations):
            timings.clear()
            started = time.perf_counter()
            step(iteration)
            total = time.perf_counter() - started
            wait, collective = timings[0]
            if iteration >= args.warmup:
                rows.append([total - wait - collective, wait, collective, total])
        table = torch.tensor(rows, dtype=torch.float64)
        if ctx.distributed:
            torch.distributed.all_reduce(table, op=torch.distributed.ReduceOp.MAX)
        if ctx.is_main:
            Path(args.out).write_text(json.dumps({"world": ctx.world_size, "rows": table.tolist()}))
    finally:
        dist.all_reduce_sum = reduce
        dist.teardown()


def all_reduce_bytes() -> list[dict[str, Any]]:
    """What one all-reduce carries: every meta-parameter (float32), and the stop flags (one per stop
    reason) and the meta-loss that ride along."""
    from distmaml.commands.train import STOP_REASONS

    from distmaml.build import build

    few = ["task.args.classes=8"]  # generated images: only the model's size matters here
    models = [("sine MLP 1-40-40-1", []),
              ("sine MLP, Meta-SGD (learned step sizes)", ["inner.rule=meta_sgd"]),
              ("Conv-4, 64 filters, Omniglot 5-way", [*OMNIGLOT_SHAPED, *few]),
              ("Conv-4, 32 filters, max-pool, mini-ImageNet 5-way",
               [*MINIIMAGENET_SHAPED, *few, "model.kind=conv4", "model.channels=32", "model.pool=max"]),
              ("ResNet-12, mini-ImageNet 5-way", [*MINIIMAGENET_SHAPED, *few, "model.kind=resnet12"])]
    out = []
    for name, overrides in models:
        learner = build(config_for(SINE, overrides))
        parameters = sum(p.numel() for p in learner.theta.values())
        out.append({"model": name, "parameters": parameters, "bytes": 4 * (parameters + len(STOP_REASONS) + 1)})
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--meta-batch", type=int, default=50)
    parser.add_argument("--inner-steps", type=int, default=5)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/distributed_cpu.json)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        args.out = args.worker_out
        return worker(args)
    forwarded = ["--meta-batch", str(args.meta_batch), "--inner-steps", str(args.inner_steps), "--iterations",
                 str(args.iterations), "--warmup", str(args.warmup)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    rows, started = [], time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            out = Path(tmp) / f"world{world}.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(world), "-m", "benchmarks.distributed", "--worker", "--worker-out", str(out),
                            *forwarded], env=env, cwd=REPO, check=True, capture_output=True)
            measured = json.loads(out.read_text())["rows"]
            compute, wait, collective, total = (statistics.median(column) * 1e3 for column in zip(*measured))
            rows.append({"world": world, "tasks_per_rank": -(-args.meta_batch // world), "compute_ms": compute,
                         "wait_ms": wait, "all_reduce_ms": collective, "step_ms": total,
                         "all_reduce_share": collective / total})
            print(f"{world} process(es): step {total:.2f} ms, all-reduce {collective:.3f} ms "
                  f"({100 * collective / total:.1f} %)", flush=True)
    result = {"benchmark": "distributed", "command": " ".join(["python -m benchmarks.distributed",
                                                               *(argv or sys.argv[1:])]),
              "machine": machine(torch.device("cpu")), "meta_batch": args.meta_batch, "inner_steps": args.inner_steps,
              "iterations": args.iterations, "wall_seconds": time.time() - started, "rows": rows,
              "all_reduce_bytes": all_reduce_bytes()}
    out = write(result, args.out or RESULTS / "distributed_cpu.json")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
