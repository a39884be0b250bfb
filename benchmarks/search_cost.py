"""Does learning a hyperparameter by its hypergradient cost less training than searching for it?
Test accuracy against the training consumed, for a learned schedule and learned example weights.

    python -m benchmarks.search_cost              # after the two learned runs below, kept checkpoints
    python -m benchmarks.search_cost --figure     # only redraw docs/search_cost.png from the stored result

The learned runs come from benchmarks.hyper_seeds with their checkpoints kept (the commands are in
docs/results.md); each kept checkpoint's phi is evaluated as the run's own evaluation does (fresh
initialisations trained for the config's steps, scored on the test split), so the learned method's
curve is its test accuracy after k outer steps. Its cost after k outer steps: k x meta_batch x T
differentiated inner steps, plus one training run of T steps that uses phi; its CPU-seconds are the
run's training time pro-rated to k (every outer step costs the same).

- Learning-rate schedule (configs/mnist1d_lr.yaml, 5 blocks): against grid search over one constant
  rate (n rates evenly spaced on the log range 1e-3 ... 3 that hyper_seeds' grid spans; n = 2 ... 16)
  and random search over the same 5-block space (each block's log rate uniform over that range;
  n = 1 ... 64 draws, the best-of-n by validation accuracy, its expected test accuracy estimated from
  a pool of draws over many subsets). Each candidate is one training run of T steps from one
  initialisation. Its cost: n x T inner steps, and n times a candidate's share of the CPU-seconds of
  the pool's training (candidates trained together on stacked weights: benchmarks.baselines).
- Hyper-cleaning (configs/digits_hyperclean.yaml, with its 360 clean validation examples and with 10
  per class): no search space reproduces per-example weights, so the comparison is with the tuned
  baselines (benchmarks/results/baselines_<case>.json) at the whole cost of their search.

Writes benchmarks/results/search_cost.json and docs/search_cost.png.
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

from benchmarks.baselines import train_schedules
from benchmarks.common import REPO, RESULTS, machine, read, write

GRID_RANGE = (1e-3, 3.0)  # the log range of benchmarks.hyper_seeds' RATE_GRID
GRID_SIZES = (2, 4, 8, 16)
RANDOM_SIZES = (1, 2, 4, 8, 16, 32, 64)
POOL = 64
SUBSETS = 2000
FIGURE = REPO / "docs" / "search_cost.png"
# hyper-cleaning protocols: the learned runs' name in benchmarks.hyper_seeds, and what the figure calls them
HYPERCLEAN = {"digits_hyperclean": "360 clean validation examples",
              "digits_hyperclean_val10": "10 clean validation examples per class"}


def learned_curve(run_dir: Path, train_seconds: float) -> list[dict[str, Any]]:
    """Test accuracy of phi at each kept checkpoint of one learned run, with the cost to reach it."""
    from distmaml.evaluate import evaluate, evaluation_settings
    from distmaml.run.checkpoint import checkpoint_iteration, list_checkpoints
    from distmaml.run.restore import load_trained

    points = []
    for path in list_checkpoints(run_dir / "checkpoints"):
        trained = load_trained(path)
        config, learner = trained.config, trained.learner
        iteration = checkpoint_iteration(path)
        found = evaluate(learner.problem, learner.theta, learner.family, learner.inner,
                         **{**evaluation_settings(config), "lr_grid": ()})
        accuracy = found["test_accuracy"]
        if isinstance(accuracy, dict):  # beside the problem's own comparisons: the learned run's entry
            accuracy = accuracy[getattr(learner.problem, "learned_name", "learned")]
        accuracy = accuracy["mean"] if isinstance(accuracy, dict) else accuracy
        steps = config.inner.steps
        points.append({"outer_steps": iteration, "test_accuracy": accuracy,
                       "inner_steps": iteration * config.train.meta_batch * steps + steps,
                       "cpu_seconds": train_seconds * iteration / config.train.iterations})
    return points


def _log_uniform(generator: torch.Generator, shape: tuple[int, ...]) -> torch.Tensor:
    low, high = (math.log(v) for v in GRID_RANGE)
    return torch.exp(low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64))


def schedule_search(seed: int, blocks: int = 5) -> dict[str, Any]:
    """Grid search over one rate and random search over `blocks`-block schedules, for one seed."""
    from distmaml.build import build
    from distmaml.config import load_config
    from distmaml.models import build_model

    config = load_config(REPO / "configs/mnist1d_lr.yaml", ["logging.progress=false"])
    learner = build(config, "cpu")
    family, data, steps = learner.family, learner.problem.data, config.inner.steps
    torch.manual_seed(1_000 * seed)
    init = [build_model(config, family.input_shape, family.num_outputs).float()]
    grid = torch.exp(torch.linspace(*(math.log(v) for v in GRID_RANGE), max(GRID_SIZES), dtype=torch.float64))
    pool = _log_uniform(torch.Generator().manual_seed(30_011 + seed), (POOL, blocks))
    block = steps // blocks
    schedules = torch.cat([grid.unsqueeze(1).expand(-1, blocks), pool]).float()
    started = time.process_time()
    found = train_schedules(init, (data.train_x.float(), data.train_y),
                            {"validation": (data.val_x.float(), data.val_y), "test": (data.test_x.float(), data.test_y)},
                            lambda step: schedules[:, min(step // block, blocks - 1)],
                            torch.zeros(len(schedules)), steps, [steps], config.training_run.batch_size, seed)
    per_candidate = (time.process_time() - started) / len(schedules)
    validation = found["validation_accuracy"][-1, :, 0].double().nan_to_num(-1.0)
    test = found["test_accuracy"][-1, :, 0].double().nan_to_num(0.0)
    out: dict[str, Any] = {"seed": seed, "cpu_seconds_per_candidate": per_candidate, "grid": [], "random": []}
    for n in GRID_SIZES:
        chosen = torch.linspace(0, max(GRID_SIZES) - 1, n).round().long()
        best = chosen[validation[chosen].argmax()]
        out["grid"].append({"candidates": n, "rate": grid[best].item(), "test_accuracy": test[best].item(),
                            "inner_steps": n * steps, "cpu_seconds": n * per_candidate})
    generator = torch.Generator().manual_seed(40_009 + seed)
    pool_validation, pool_test = validation[len(grid):], test[len(grid):]
    for n in RANDOM_SIZES:
        picks = torch.stack([torch.randperm(POOL, generator=generator)[:n] for _ in range(SUBSETS)])
        best = picks.gather(1, pool_validation[picks].argmax(1, keepdim=True)).squeeze(1)
        out["random"].append({"candidates": n, "test_accuracy": pool_test[best].mean().item(),
                              "inner_steps": n * steps, "cpu_seconds": n * per_candidate})
    return out


def _mean_std(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.mean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _by_position(curves: list[list[dict[str, Any]]], key: str = "outer_steps") -> list[dict[str, Any]]:
    """Seeds' curves, point by point (the same x for each seed): the mean and spread over seeds."""
    out = []
    for points in zip(*curves):
        assert len({p[key] for p in points}) == 1, "seeds' curves must share their points"
        out.append({key: points[0][key], "inner_steps": statistics.mean(p["inner_steps"] for p in points),
                    "cpu_seconds": statistics.mean(p["cpu_seconds"] for p in points),
                    "test_accuracy": _mean_std([p["test_accuracy"] for p in points])})
    return out


def measure(runs: Path) -> dict[str, Any]:
    schedule = read(RESULTS / "hyper_learning_rate_schedule.json")
    learned_schedule = [learned_curve(runs / "learning_rate_schedule" / f"seed{row['seed']}", row["train_seconds"])
                        for row in schedule["rows"]]
    searches = [schedule_search(row["seed"]) for row in schedule["rows"]]
    out = {"schedule": {"seeds": [row["seed"] for row in schedule["rows"]], "learned": _by_position(learned_schedule),
                        "grid": _by_position([s["grid"] for s in searches], "candidates"),
                        "random": _by_position([s["random"] for s in searches], "candidates"),
                        "learned_per_seed": learned_schedule, "searches": searches},
           "hyperclean": {}}
    for name, protocol in HYPERCLEAN.items():
        learned = read(RESULTS / f"hyper_{name}.json")
        tuned = read(RESULTS / f"baselines_{name}.json")
        curves = [learned_curve(runs / name / f"seed{row['seed']}", row["train_seconds"]) for row in learned["rows"]]
        baselines = {}
        for baseline in tuned["rows"][0]["baselines"]:
            found = [row["baselines"][baseline] for row in tuned["rows"]]
            baselines[baseline] = {"test_accuracy": _mean_std([f["test_accuracy"] for f in found]),
                                   "inner_steps": statistics.mean(f["search"]["inner_steps"] for f in found),
                                   "cpu_seconds": statistics.mean(f["search"]["cpu_seconds"] for f in found)}
        out["hyperclean"][name] = {"protocol": protocol, "seeds": [row["seed"] for row in learned["rows"]],
                                   "learned": _by_position(curves), "learned_per_seed": curves,
                                   "baselines": baselines}
    return out


def figure(result: dict[str, Any], path: Path = FIGURE) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    from distmaml.files import write_figure

    panels = 1 + len(result["hyperclean"])
    fig = Figure(figsize=(5.5 * panels, 4.4))
    axes_row = fig.subplots(1, panels)

    def curve(axes, points, label, style):
        x = [p["inner_steps"] for p in points]
        mean = [100 * p["test_accuracy"]["mean"] for p in points]
        std = [100 * p["test_accuracy"]["std"] for p in points]
        axes.errorbar(x, mean, yerr=std, fmt=style, label=label, capsize=3, markersize=4)

    s = result["schedule"]
    left = axes_row[0]
    curve(left, s["learned"], "learned 5-block schedule (hypergradient)", "o-")
    curve(left, s["grid"], "grid search, one constant rate", "s--")
    curve(left, s["random"], "random search, 5-block schedules", "^:")
    left.set_title("MNIST-1D learning-rate schedule, T = 1,000")
    for axes, h in zip(axes_row[1:], result["hyperclean"].values()):
        curve(axes, h["learned"], "learned example weights (hypergradient)", "o-")
        for (name, found), marker in zip(h["baselines"].items(), "sDv^"):
            axes.errorbar([found["inner_steps"]], [100 * found["test_accuracy"]["mean"]],
                          yerr=[100 * found["test_accuracy"]["std"]], fmt=marker, capsize=3,
                          label=f"{name} (tuned; its search's cost)")
        axes.set_title(f"digits hyper-cleaning, {h['protocol']}", fontsize=10)
    for axes in axes_row:
        axes.set_xscale("log")
        axes.set_xlabel("inner steps consumed")
        axes.set_ylabel("test accuracy %, mean ± std over seeds")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7)
    fig.tight_layout()
    write_figure(path, fig, dpi=110)
    return path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, default=Path("runs/hyper_seeds"),
                        help="where benchmarks.hyper_seeds kept the learned runs")
    parser.add_argument("--figure", action="store_true", help="only redraw the figure from the stored result")
    parser.add_argument("--out", type=Path, default=RESULTS / "search_cost.json")
    args = parser.parse_args(argv)
    if args.figure:
        result = read(args.out)
    else:
        torch.set_num_threads(1)
        started = time.time()
        result = {"benchmark": "search_cost", "command": " ".join(["python -m benchmarks.search_cost",
                                                                   *(argv or sys.argv[1:])]),
                  "machine": machine(torch.device("cpu")), **measure(args.runs)}
        result["wall_seconds"] = time.time() - started
        print(f"wrote {write(result, args.out)}")
    print(f"wrote {figure(result)}")
    return result


if __name__ == "__main__":
    main()
