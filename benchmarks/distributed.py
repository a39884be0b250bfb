"""Time per meta-iteration split into compute and the meta-gradient all-reduce, for 1 and 2 processes.

    python benchmarks/distributed.py                      # sine, meta-batch 50, K = 5, worlds 1 and 2 (CPU, gloo)
    python benchmarks/distributed.py --worlds 1 2 4 --iterations 200 --inner-steps 5

Each world size is a fresh `torchrun --standalone` of this file. A rank times, per iteration: compute
(sample its shard, batched meta-gradient of its tasks, Adam step), wait (a barrier: how long the
fastest rank idles for the slowest, i.e. imbalance and noise, not communication) and all-reduce (the
one flat SUM of the meta-gradient plus the stop flag, exactly what the trainer sends). The table
shows medians over iterations of the per-iteration maximum over ranks. It also prints how many bytes
one all-reduce carries for the sine MLP and for Conv-4.
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

REPO = Path(__file__).resolve().parents[1]


def conv4_parameters(in_channels: int, image_size: int, ways: int, channels: int = 64) -> int:
    """Parameters of Conv-4 (4 x [3x3 conv, batch norm, ReLU, 2x2 max-pool], linear head)."""
    total, size, previous = 0, image_size, in_channels
    for _ in range(4):
        total += 3 * 3 * previous * channels + channels + 2 * channels  # conv weight, bias, BN scale and shift
        previous, size = channels, size // 2
    return total + channels * size * size * ways + ways


def worker(args) -> None:
    import torch

    from distmaml import dist
    from distmaml.config import load_config
    from distmaml.meta import meta_gradient
    from distmaml.models import build_model
    from distmaml.tasks import build_task_family
    from distmaml.tasks.rng import STREAM_TRAIN

    torch.set_num_threads(1)
    config = load_config(REPO / "configs/sine_maml.yaml",
                         [f"train.meta_batch={args.meta_batch}", f"task.support={args.shots}",
                          f"inner.steps={args.inner_steps}", "engine.device=cpu"])
    ctx = dist.init("cpu")
    try:
        torch.manual_seed(0)
        model = build_model(config)
        params = dict(model.named_parameters())
        optimizer = torch.optim.Adam(params.values(), lr=config.train.lr)
        family = build_task_family(config, ctx.device)
        shard = dist.shard(config.train.meta_batch, ctx.rank, ctx.world_size)
        indices = torch.arange(shard.start, shard.stop)
        inner = config.inner
        rows = []
        for iteration in range(args.warmup + args.iterations):
            t0 = time.perf_counter()
            batch = family.sample(STREAM_TRAIN, iteration, indices)
            result = meta_gradient(model, params, batch, inner.lr, inner.steps, inner.mode, inner.truncate,
                                   family.loss)
            t1 = time.perf_counter()
            dist.barrier(ctx)
            t2 = time.perf_counter()
            *grads, _ = dist.all_reduce_sum([*result.grad_sum.values(), torch.zeros(1)], ctx)
            t3 = time.perf_counter()
            for param, grad in zip(params.values(), grads):
                param.grad = grad / config.train.meta_batch
            optimizer.step()
            t4 = time.perf_counter()
            if iteration >= args.warmup:
                rows.append([t1 - t0 + t4 - t3, t2 - t1, t3 - t2])
        table = torch.tensor(rows, dtype=torch.float64)
        if ctx.distributed:
            torch.distributed.all_reduce(table, op=torch.distributed.ReduceOp.MAX)
        if ctx.is_main:
            n_params = sum(p.numel() for p in params.values())
            Path(args.out).write_text(json.dumps({"world": ctx.world_size, "rows": table.tolist(),
                                                  "params": n_params}))
    finally:
        dist.teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--meta-batch", type=int, default=50)
    parser.add_argument("--shots", type=int, default=5, help="K, support examples per task")
    parser.add_argument("--inner-steps", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    forwarded = ["--meta-batch", str(args.meta_batch), "--shots", str(args.shots), "--inner-steps",
                 str(args.inner_steps), "--iterations", str(args.iterations), "--warmup", str(args.warmup)]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for world in args.worlds:
            out = Path(tmp) / f"world{world}.json"
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                            str(world), __file__, "--worker", "--out", str(out), *forwarded], env=env, check=True)
            results.append(json.loads(out.read_text()))

    print(f"\nsine MLP, meta-batch {args.meta_batch}, K = {args.shots}, {args.inner_steps} inner step(s), "
          f"{args.iterations} timed iterations, CPU (gloo), medians of the slowest rank:\n")
    print("| processes | tasks/rank | compute ms | wait ms | all-reduce ms | step ms | all-reduce share |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for result in results:
        compute, wait, reduce = (statistics.median(column) * 1e3 for column in zip(*result["rows"]))
        step = statistics.median(sum(row) for row in result["rows"]) * 1e3
        world = result["world"]
        print(f"| {world} | {-(-args.meta_batch // world)} | {compute:.2f} | {wait:.2f} | {reduce:.3f} | {step:.2f} "
              f"| {100 * reduce / step:.1f}% |")

    sine = results[0]["params"]
    print("\nBytes per all-reduce (float32 parameters + 1 stop flag, one flat buffer):\n")
    print("| model | parameters | bytes |")
    print("|---|---:|---:|")
    for name, count in [("sine MLP 1-40-40-1", sine),
                        ("Conv-4, 64 ch, 5-way, Omniglot 28x28x1", conv4_parameters(1, 28, 5)),
                        ("Conv-4, 64 ch, 5-way, miniImageNet 84x84x3", conv4_parameters(3, 84, 5))]:
        print(f"| {name} | {count:,} | {4 * (count + 1):,} ({4 * (count + 1) / 1024:.1f} KiB) |")


if __name__ == "__main__":
    main()
