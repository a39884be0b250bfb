"""Milliseconds per meta-iteration: per-task loop, batched engine eager, batched engine as one CUDA graph.

    python benchmarks/gpu_speed.py                 # on a GPU: every row; on the CPU: all but the graph rows
    python benchmarks/gpu_speed.py --quick         # fewer rows (the issue's targets)

Every row times what training runs (distmaml.engine.MetaStep: sampling, meta-gradient, clipping,
Adam), in one process on one device, and reports ms per meta-iteration, tasks/s and peak memory.
Loop rows whose estimated time per iteration exceeds --loop-budget seconds are skipped.
"""

from __future__ import annotations

import argparse
import time

import torch

from distmaml import dist
from distmaml.config import load_config
from distmaml.engine import MetaStep, make_optimizer
from distmaml.models import build_model
from distmaml.tasks import build_task_family


def build_step(overrides: list[str], device: torch.device, engine: str, omniglot_root: str | None):
    settings = [f"engine.batched={engine != 'loop'}", f"engine.cuda_graph={engine.startswith('graph')}",
                f"engine.dtype={'bf16' if engine.endswith('bf16') else 'float32'}", *overrides]
    if omniglot_root:
        settings.append(f"data.root={omniglot_root}")
    config = load_config(None, settings)
    torch.manual_seed(0)
    model = build_model(config).to(device)
    params = dict(model.named_parameters())
    optimizer = make_optimizer(params.values(), config.train.lr, device)
    family = build_task_family(config, device)
    return MetaStep(model, params, optimizer, family, config, dist.Context(device=device))


def time_row(step: MetaStep, device: torch.device, min_seconds: float, max_iterations: int) -> tuple[float, float]:
    """(ms per iteration, peak MiB) after warm-up (which includes graph capture)."""
    cuda = device.type == "cuda"
    for i in range(5):
        step(i)
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    iterations, start = 0, time.perf_counter()
    while iterations < max_iterations and (iterations < 3 or time.perf_counter() - start < min_seconds):
        step(5 + iterations)
        iterations += 1
        if cuda and iterations % 50 == 0:
            torch.cuda.synchronize(device)
    if cuda:
        torch.cuda.synchronize(device)
    elapsed = (time.perf_counter() - start) / iterations
    if cuda:
        peak = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        import resource

        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return 1000 * elapsed, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="only the rows of the issue's targets")
    parser.add_argument("--seconds", type=float, default=1.0, help="timing window per row")
    parser.add_argument("--loop-budget", type=float, default=1.0, help="skip loop rows slower than this (s/it)")
    parser.add_argument("--omniglot-root", help="Omniglot data folder (default: random images of the same shape)")
    args = parser.parse_args()
    device = torch.device(args.device)
    engines = ["loop", "eager"] + (["graph", "graph bf16"] if device.type == "cuda" else [])

    sine = [(b, k, m) for b in (25, 1000) for k in (1, 5, 10, 50) for m in ("second_order", "first_order")]
    omniglot = [(32, k, "second_order") for k in (1, 5)]
    if args.quick:
        sine = [(25, 5, "second_order"), (25, 1, "second_order"), (1000, 5, "second_order")]
        omniglot = [(32, 1, "second_order"), (32, 5, "second_order")]

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"device {name}, torch {torch.__version__}\n")
    print("| task | meta-batch | K | mode | engine | ms / meta-iteration | tasks / s | peak MiB | vs loop |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = [("sine", b, k, m, [f"train.meta_batch={b}", f"inner.steps={k}", f"inner.mode={m}",
                                "inner.checkpoint=none"]) for b, k, m in sine]
    rows += [("omniglot 5w1s", b, k, m, [
        "task.family=omniglot", "task.ways=5", "task.support=1", "task.query=15", "model.kind=conv4",
        "inner.lr=0.4", f"train.meta_batch={b}", f"inner.steps={k}", f"inner.mode={m}"]) for b, k, m in omniglot]
    for task, batch, steps, mode, overrides in rows:
        loop_ms = None
        for engine in engines:
            if engine == "loop" and batch * steps * (0.002 if device.type == "cuda" else 0.004) > args.loop_budget:
                print(f"| {task} | {batch} | {steps} | {mode} | loop | skipped (> {args.loop_budget} s/it est.) | | | |")
                continue
            try:
                step = build_step(overrides, device, engine, args.omniglot_root)
            except (FileNotFoundError, ValueError) as err:
                print(f"| {task} | {batch} | {steps} | {mode} | {engine} | unavailable: {err} | | | |")
                break
            ms, peak = time_row(step, device, args.seconds, 10 if engine == "loop" else 100000)
            if engine == "loop":
                loop_ms = ms
            speedup = f"{loop_ms / ms:.0f}x" if loop_ms and engine != "loop" else ""
            print(f"| {task} | {batch} | {steps} | {mode} | {engine} | {ms:.2f} | {batch / ms * 1000:.0f} | "
                  f"{peak:.0f} | {speedup} |", flush=True)
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
