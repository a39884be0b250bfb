"""Learned hyperparameters and learned data over training seeds, each against the baselines it should beat.

    python -m benchmarks.hyper_seeds learning_rate --seeds 0 1 2     # configs/mnist1d_lr.yaml
    python -m benchmarks.hyper_seeds activation --seeds 0 1 2        # configs/mnist1d_activation.yaml
    python -m benchmarks.hyper_seeds weight_decay --seeds 0 1 2      # configs/mnist1d_weight_decay.yaml
    python -m benchmarks.hyper_seeds logistic --seeds 0 1 2          # configs/logistic_weight_decay.yaml
    python -m benchmarks.hyper_seeds digits_hyperclean               # configs/digits_hyperclean.yaml, ...
    python -m benchmarks.hyper_seeds digits_distill distill.per_class=10 --name digits_distill_m10

Each seed trains the config (train.seed = seed; `distmaml train`'s own code, in this process) and
evaluates the learned meta-parameters on the run's evaluation tasks: fresh random initialisations
trained for the config's inner steps, scored on the validation and test splits, at the end of the
learned run's budget. The baselines each result is compared with are trained by one rule, each at its
own tuned settings, by benchmarks.baselines; this file records only what the run's own evaluation
reports beside the learned run: for learning_rate, the grid over the learned rate's own space (plain
SGD at each rate of a log grid, 1e-3 ... 3, for the same T steps without decay; chosen by the outer
loss on the validation split, by validation accuracy, and, as an oracle, by test accuracy); for the
problems with baselines of their own (hyperclean, distill), those at the learned run's budget, and
the distilled data from one fixed initialisation (an ablation); and the detected flips' precision and
recall.

Writes benchmarks/results/hyper_<problem>.json: per seed the learned values, the learned run's and
each baseline's test accuracy and validation loss, and the training time.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import REPO, RESULTS, machine, write
from distmaml.commands.train import train
from distmaml.config import load_config

CONFIGS = {"learning_rate": "configs/mnist1d_lr.yaml", "activation": "configs/mnist1d_activation.yaml",
           "weight_decay": "configs/mnist1d_weight_decay.yaml", "logistic": "configs/logistic_weight_decay.yaml",
           **{f"{data}_{problem}": f"configs/{data}_{problem}.yaml" for data in ("digits", "mnist1d")
              for problem in ("hyperclean", "distill")}}
RATE_GRID = [1e-3 * (3 / 1e-3) ** (i / 15) for i in range(16)]


def _score(result: dict[str, Any]) -> dict[str, float]:
    last = result["steps"][-1]
    return {"test_accuracy": last.get("test_accuracy", math.nan), "validation_loss": last["loss"],
            "validation_accuracy": last.get("accuracy", math.nan)}


def _accuracy(value) -> float:
    return value["mean"] if isinstance(value, dict) else value


def run_seed(problem_name: str, seed: int, out_dir: Path, overrides: list[str]) -> dict[str, Any]:
    extra = [f"eval.lr_grid={RATE_GRID}"] if problem_name == "learning_rate" else []
    config = load_config(REPO / CONFIGS[problem_name], [f"train.seed={seed}", f"run.dir={out_dir / f'seed{seed}'}",
                                                       "logging.progress=false", *extra, *overrides])
    summary = train(config)
    if summary["status"] != "complete":
        raise SystemExit(f"seed {seed}: training ended {summary['status']}: {summary.get('error', '')}")
    row = {"seed": seed, "train_seconds": summary["train_seconds"], "learned": summary["eval"].get("learned", {}),
           "learned_run": _score(summary["eval"]), "baselines": {}}
    if isinstance(summary["eval"].get("test_accuracy"), dict):  # the problem's own baselines
        accuracies = dict(summary["eval"]["test_accuracy"])
        learned_name = next(iter(accuracies))
        row["learned_run"]["test_accuracy_ci95"] = (accuracies[learned_name] or {}).get("ci95") if isinstance(
            accuracies[learned_name], dict) else None
        row["learned_run"]["test_accuracy"] = _accuracy(accuracies.pop(learned_name))
        row["baselines"].update({name: {"test_accuracy": _accuracy(value)} for name, value in accuracies.items()})
        for key in ("flip_detection", "examples_per_class", "baseline_lr"):
            if key in summary["eval"]:
                row[key] = summary["eval"][key]
    if "grid" in summary["eval"]:
        grid = summary["eval"]["grid"]
        row["grid"] = grid
        chosen_by = "validation soft error" if "validation_outer_loss" in grid else "validation loss"
        row["baselines"][f"SGD rate grid (best by {chosen_by}, {grid['best_lr']:.3g})"] = {
            "test_accuracy": grid["test_accuracy_at_best"],
            "validation_loss": grid["validation_loss"][grid["lrs"].index(grid["best_lr"])]}
        if grid.get("validation_accuracy"):  # what a practitioner tuning for accuracy would pick
            pick = max(range(len(grid["lrs"])), key=lambda i: grid["validation_accuracy"][i])
            row["baselines"][f"SGD rate grid (best by validation accuracy, {grid['lrs'][pick]:.3g})"] = {
                "test_accuracy": grid["test_accuracy"][pick], "validation_loss": grid["validation_loss"][pick]}
        best_accuracy = max(grid["test_accuracy"])
        row["baselines"][f"SGD rate grid (best test accuracy, {grid['lrs'][grid['test_accuracy'].index(best_accuracy)]:.3g})"] = {
            "test_accuracy": best_accuracy, "validation_loss": math.nan}
    return row


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("problem", choices=list(CONFIGS))
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings for every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", type=Path, default=Path("runs/hyper_seeds"), help="run directories go here")
    parser.add_argument("--name", default=None, help="the result's name (default: the problem's)")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/hyper_<name>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started, rows = time.time(), []
    name = args.name or args.problem
    for seed in args.seeds:
        rows.append(run_seed(args.problem, seed, args.runs / name, args.overrides))
        print(f"seed {seed}: learned {rows[-1]['learned_run']}, baselines {rows[-1]['baselines']}", flush=True)
    accuracies = [row["learned_run"]["test_accuracy"] for row in rows]
    result = {"benchmark": "hyper_seeds", "problem": args.problem, "name": name, "config": CONFIGS[args.problem],
              "overrides": args.overrides,
              "command": " ".join(["python -m benchmarks.hyper_seeds", *(argv or sys.argv[1:])]),
              "machine": machine(torch.device("cpu")), "wall_seconds": time.time() - started, "rows": rows,
              "learned_test_accuracy_mean": statistics.mean(accuracies),
              "learned_test_accuracy_std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0}
    print(f"wrote {write(result, args.out or RESULTS / f'hyper_{name}.json')}")
    return result


if __name__ == "__main__":
    main()
