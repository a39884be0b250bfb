"""Meta-iterations per second: the batched (vmap) engine against the per-task loop reference.

    python benchmarks/core_speed.py [--meta-batch 25] [--steps 1 5 10] [--repeats 5] [--device cpu]

One meta-iteration = sample this iteration's tasks, compute the meta-gradient, take the Adam step,
exactly as distmaml.train does in one process. Prints a Markdown table. Not a test: numbers depend
on the machine and on whatever else runs on it; the median of several timed windows is reported.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from distmaml.meta import meta_gradient, meta_gradient_loop
from distmaml.models import MLP
from distmaml.tasks.rng import STREAM_TRAIN
from distmaml.tasks.sine import SineTasks


def seconds_per_iteration(engine: str, mode: str, steps: int, meta_batch: int, device: str, repeats: int,
                          window: float = 1.0) -> float:
    torch.manual_seed(0)
    model = MLP().to(device)
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    family = SineTasks(device=device)
    indices = torch.arange(meta_batch, device=device)
    iteration = 0

    def one_iteration():
        nonlocal iteration
        batch = family.sample(STREAM_TRAIN, iteration, indices)
        if engine == "batched":
            grads = meta_gradient(model, params, batch, 0.01, steps, mode).grad_sum
        else:
            grads = meta_gradient_loop(model, params, batch, 0.01, steps, mode)[0]
        for param, grad in zip(params.values(), grads.values()):
            param.grad = grad / meta_batch
        optimizer.step()
        iteration += 1

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    for _ in range(3):
        one_iteration()
    samples = []
    for _ in range(repeats):
        sync()
        start, count = time.perf_counter(), 0
        while time.perf_counter() - start < window:
            one_iteration()
            count += 1
        sync()
        samples.append((time.perf_counter() - start) / count)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--meta-batch", type=int, default=25)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--modes", nargs="+", default=["second_order", "first_order"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    print(f"meta-batch {args.meta_batch}, sine MLP 1-40-40-1, device {args.device}, {args.threads} thread(s), "
          f"torch {torch.__version__}\n")
    print("| mode | K | loop it/s | batched it/s | speed-up | batched tasks/s |")
    print("|---|---|---|---|---|---|")
    for mode in args.modes:
        for steps in args.steps:
            loop = seconds_per_iteration("loop", mode, steps, args.meta_batch, args.device, args.repeats)
            batched = seconds_per_iteration("batched", mode, steps, args.meta_batch, args.device, args.repeats)
            print(f"| {mode} | {steps} | {1 / loop:.1f} | {1 / batched:.1f} | {loop / batched:.1f}x | "
                  f"{args.meta_batch / batched:.0f} |", flush=True)


if __name__ == "__main__":
    main()
