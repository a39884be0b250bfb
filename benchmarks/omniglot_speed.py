"""Meta-training speed on Omniglot: tasks per second of the batched engine (vmap over tasks,
meta.meta_gradient) against the per-task loop (meta.meta_gradient_loop), second-order MAML,
5-way 1-shot with 15 query images per class, Conv-4 with 64 filters, meta-batch 32, for K = 1
and 5 inner steps. Prints a Markdown table.

    PYTHONPATH=. python benchmarks/omniglot_speed.py [--data ../shared/data/omniglot] [--repeats 3]

Only the shapes matter, so without the data set it times random 28x28 images.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch

from distmaml import meta
from distmaml.models import Conv4
from distmaml.tasks.omniglot import OmniglotTasks, cross_entropy
from distmaml.tasks.omniglot_data import Character, OmniglotData, OmniglotDataError, load_omniglot
from distmaml.tasks.rng import STREAM_TRAIN

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/omniglot"


def omniglot_or_random(root: Path) -> tuple[OmniglotData, str]:
    try:
        return load_omniglot(root), "Omniglot"
    except OmniglotDataError:
        images = np.random.default_rng(0).integers(0, 256, size=(1623, 20, 28, 28), dtype=np.uint8)
        characters = [Character("images_background" if i < 964 else "images_evaluation", "random", f"c{i}")
                      for i in range(1623)]
        return OmniglotData(images, characters), "random images"


def tasks_per_second(step, meta_batch: int, repeats: int) -> float:
    step()  # warm-up: allocator, first-call dispatch
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return meta_batch * repeats / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--meta-batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    data, source = omniglot_or_random(args.data)
    family = OmniglotTasks(data, ways=5, support=1, query=15)
    batch = family.sample(STREAM_TRAIN, 0, torch.arange(args.meta_batch))
    torch.manual_seed(0)
    model = Conv4(5, args.channels)
    params = {name: value.detach().requires_grad_() for name, value in model.named_parameters()}
    print(f"Omniglot 5-way 1-shot, 15 query/class, Conv-4 ({args.channels} filters), meta-batch {args.meta_batch}, "
          f"second order, float32, {source}, {torch.get_num_threads()} CPU threads\n")
    print("| inner steps K | batched (tasks/s) | per-task loop (tasks/s) | speed-up |")
    print("|---:|---:|---:|---:|")
    for steps in args.steps:
        batched = tasks_per_second(lambda: meta.meta_gradient(
            model, params, batch, 0.4, steps, "second_order", loss_fn=cross_entropy), args.meta_batch, args.repeats)
        loop = tasks_per_second(lambda: meta.meta_gradient_loop(
            model, params, batch, 0.4, steps, "second_order", loss_fn=cross_entropy), args.meta_batch, args.repeats)
        print(f"| {steps} | {batched:.1f} | {loop:.1f} | {batched / loop:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
