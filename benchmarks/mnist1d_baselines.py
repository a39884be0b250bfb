"""The MNIST-1D pipeline check: plain training of the paper's MLP and CNN on distmaml's data and models.

    python -m benchmarks.mnist1d_baselines            # 3 seeds each, the paper's recipe

The paper's recipe (Greydanus and Kobak 2024, mnist1d's train.py): Adam at 1e-2, batch 100, 8,000
steps, no weight decay, trained on the 4,000 training sequences and scored on the 1,000 test ones.
Published test accuracy: MLP 68 %, CNN 94 %. The data and networks are distmaml's own (task.family
mnist1d, model.kind mlp [100, 100] and conv1d); the loop is plain PyTorch.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from benchmarks.common import RESULTS, machine, write
from distmaml.models import build_model
from distmaml.config import load_config
from distmaml.tasks.mnist1d import load_mnist1d

MODELS = {"MLP 100-100": ["model.kind=mlp", "model.hidden=[100, 100]"], "CNN (conv1d, 25 channels)":
          ["model.kind=conv1d", "model.channels=25"]}
PUBLISHED = {"MLP 100-100": 0.68, "CNN (conv1d, 25 channels)": 0.94}


def train_once(overrides: list[str], seed: int, steps: int, batch: int = 100, lr: float = 1e-2) -> float:
    x, y, test_x, test_y = (t.float() if t.is_floating_point() else t for t in load_mnist1d())
    torch.manual_seed(seed)
    model = build_model(load_config(None, overrides), (x.shape[1],), 10)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        index = torch.randint(0, x.shape[0], (batch,), generator=generator)
        loss = torch.nn.functional.cross_entropy(model(x[index]), y[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (model(test_x).argmax(-1) == test_y).float().mean().item()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/mnist1d_baselines.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    rows, started = [], time.time()
    for name, overrides in MODELS.items():
        accuracies = [train_once(overrides, seed, args.steps) for seed in args.seeds]
        rows.append({"model": name, "seeds": args.seeds, "test_accuracy": accuracies,
                     "mean": statistics.mean(accuracies), "std": statistics.stdev(accuracies) if len(accuracies) > 1
                     else 0.0, "published": PUBLISHED[name]})
        print(f"{name:<28} test accuracy {100 * rows[-1]['mean']:.1f} ± {100 * rows[-1]['std']:.1f} % over seeds "
              f"{args.seeds} (published {100 * PUBLISHED[name]:.0f} %)", flush=True)
    result = {"benchmark": "mnist1d_baselines", "command": " ".join(["python -m benchmarks.mnist1d_baselines",
                                                                      *(argv or sys.argv[1:])]),
              "machine": machine(torch.device("cpu")), "steps": args.steps, "wall_seconds": time.time() - started,
              "rows": rows}
    print(f"wrote {write(result, args.out or RESULTS / 'mnist1d_baselines.json')}")
    return result


if __name__ == "__main__":
    main()
