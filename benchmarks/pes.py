"""One learning rate learned by persistent evolution strategies against truncated ES, from far below and
far above the grid's best rate, over training seeds.

    python -m benchmarks.pes --seeds 0 1 2                      # -> results/pes_lr.json, docs/pes_lr.png
    python -m benchmarks.pes --methods pes_schedule --starts 0.1  # the five-block schedule, added to it
    python -m benchmarks.pes --objective                        # the objective at fixed rates, added to it

The set-up is configs/mnist1d_lr_pes.yaml (plain SGD on MNIST-1D, batch 100, horizon H = 1,000, the
validation soft error every U = 10 steps along the horizon as the objective), from 0.1 and from 3.0:

    pes   16 antithetic pairs of persistent runs (online.runs = 32), each particle's perturbed steps its
          real training, staggered over the horizon
    pes_noise_reuse  the same PES with one perturbation per pair's life (es.reuse_noise)
    pes_sigma_0.3  the same PES with sigma 0.3 instead of the config's 0.1 (more smoothing of the objective)
    exact  the exact hypergradient through all 1,000 steps, episodically: configs/mnist1d_lr.yaml (40
          outer steps of 4 fresh runs each) from the same starts
    pes_schedule  the same PES, at sigma 0.3, for a schedule of five rates, one per 200-step block of the horizon
    es    truncated ES: 2 persistent runs, each estimated from 8 antithetic pairs of 10-step unrolls from
          its state and moved on at the unperturbed rate (17 x 10 inner steps per run and outer step
          against PES's 10 per particle: the same budget to within 6 %)

Each for ITERATIONS outer steps (Adam on the log rate, cosine from train.lr to train.lr_min, the
meta-gradient's norm clipped at train.grad_clip: PES's estimates are heavy-tailed). Reported: the final
rate, the rate's median and range over the last third of the run (an unbiased estimate that is not yet
usable wanders there), the test accuracy of 8 fresh 1,000-step runs at the final rate, and the grid of
fixed rates from results/online_lr.json (the same seeds' evaluation tasks) for the best fixed rate.
The truncated backpropagation rows are those of results/online_lr.json.
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

from benchmarks.common import REPO, RESULTS, machine, read, write
from benchmarks.online import LR_STARTS, _best, finish_rate_figure
from benchmarks.tables import markdown_table
from distmaml.commands.train import train
from distmaml.config import load_config
from distmaml.run.checkpoint import checkpoint_iteration, list_checkpoints, load_checkpoint

CONFIG = "configs/mnist1d_lr_pes.yaml"
ITERATIONS = 1500
EVERY = 50
METHODS = {"pes": [], "es": ["inner.mode=es", "online.runs=2", "es.pairs=8", "es.sigma=0.3"],
           # five rates, one per 200-step block of the horizon (at sigma 0.3)
           "pes_schedule": ["inner.schedule_blocks=5", "es.sigma=0.3"],
           "pes_sigma_0.3": ["es.sigma=0.3"],  # three times the config's perturbation: more smoothing
           "pes_noise_reuse": ["es.reuse_noise=true"],  # one perturbation per pair's life (Li et al. 2023)
           # the exact hypergradient through all 1,000 steps, episodically (configs/mnist1d_lr.yaml, its own
           # 40 outer steps of 4 runs; its spikes would stop it at the default max_grad_norm_factor)
           "exact": ["train.max_grad_norm_factor=0"]}
# A method that is not run on CONFIG: its config, outer steps and checkpoint interval.
EPISODIC = {"exact": ("configs/mnist1d_lr.yaml", 40, 2)}
FIGURE = REPO / "docs" / "pes_lr.png"


def _inner_steps_per_outer_step(config) -> int:
    """Inner steps one outer step takes over all runs: PES's particles' own; ES's pairs and real step."""
    online = config.online
    if not online.runs:  # episodic: every task a whole training run
        return config.train.meta_batch * config.inner.steps
    per_run = online.unroll * (2 * config.es.pairs + 1) if config.inner.mode == "es" else online.unroll
    return per_run * online.runs


def run_seed(method: str, start: float, seed: int, out_dir: Path, iterations: int) -> dict[str, Any]:
    run_dir = out_dir / f"{method}_{start:g}_{seed}"
    config = _config(method, start, seed, run_dir, iterations)
    started = time.perf_counter()
    summary = train(config)
    return collect(method, start, seed, run_dir, config, summary, time.perf_counter() - started)


def _config(method: str, start: float, seed: int, run_dir: Path, iterations: int):
    config_path, iterations, every = EPISODIC.get(method, (CONFIG, iterations, EVERY))
    return load_config(REPO / config_path, [*METHODS[method], f"inner.lr={start}", f"train.seed={seed}",
                                            f"train.iterations={iterations}", f"run.dir={run_dir}", "run.resume=false",
                                            "logging.progress=false", f"train.log_every={every}",
                                            f"train.checkpoint_every={every}",
                                            f"train.keep_checkpoints={iterations // every + 2}", "eval.lr_grid=[]"])


def collect(method: str, start: float, seed: int, run_dir: Path, config, summary: dict, seconds: float) -> dict[str, Any]:
    """A finished run's row: its rate trajectory from its checkpoints, its evaluation from its summary."""
    iterations = config.train.iterations
    trajectory = [{"iteration": 0, "rate": start}]
    kept = list_checkpoints(run_dir / "checkpoints") if (run_dir / "checkpoints").is_dir() else []
    for path in kept:  # none where the run diverged before its first checkpoint
        rates = load_checkpoint(path)["rule"]["inner.lr.log_schedule"].exp().tolist()
        trajectory.append({"iteration": checkpoint_iteration(path), "rate": rates[0], "rates": rates})
    # A run stopped early (diverged) has no last third: its last rate stands for it.
    last_third = [point["rate"] for point in trajectory if point["iteration"] >= 2 * iterations / 3] or \
        [trajectory[-1]["rate"]]
    evaluation = summary.get("eval") or {}
    return {"method": method, "start": start, "seed": seed, "status": summary["status"], "train_seconds": seconds,
            # the outer steps it took (a diverged run stops early)
            "inner_steps": _inner_steps_per_outer_step(config) * summary.get("iteration", iterations),
            "final_rate": trajectory[-1]["rate"],
            "final_rates": trajectory[-1].get("rates", [start]),
            "last_third_median": statistics.median(last_third), "last_third_min": min(last_third),
            "last_third_max": max(last_third), "trajectory": trajectory,
            "test_accuracy": evaluation.get("test_accuracy"),
            "validation_soft_error": _validation_soft_error(summary),
            "restarts_not_finite": (summary.get("online") or {}).get("restarts_not_finite")}


OBJECTIVE_RATES = (0.2, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0)


def objective(rates=OBJECTIVE_RATES, runs: int = 8, seed: int = 0) -> dict[str, list[float]]:
    """The objective PES follows at fixed rates: the validation soft error every U = 10 steps along a
    1,000-step run, averaged, over `runs` fresh runs of the evaluation stream; beside it the soft error
    after the last step (what the grid's choice by validation reads)."""
    from distmaml.build import build
    from distmaml.meta import unroll
    from distmaml.meta.unrolling import task_values
    from distmaml.rng import STREAM_EVAL

    # configs/mnist1d_lr.yaml is the same set-up, episodic: its tasks are fresh 1,000-step runs.
    config = load_config(REPO / "configs/mnist1d_lr.yaml", [f"train.seed={seed}", "logging.progress=false"])
    learner = build(config)
    tasks = learner.family.sample(STREAM_EVAL, 0, torch.arange(runs))
    points = list(range(10, 1001, 10))
    trajectory_mean, final = [], []
    for rate in rates:
        phi = {name: torch.full_like(value, math.log(rate)) for name, value in learner.theta.items()}
        with torch.no_grad():
            result = unroll(learner.problem, phi, tasks, learner.inner, differentiated=0, trajectory=points)
            errors = torch.stack([task_values(learner.problem.outer_loss, weights, phi, tasks)
                                  for weights in result.trajectory])  # [points, runs]
        trajectory_mean.append(float(errors.nan_to_num(1.0).mean()))
        final.append(float(errors[-1].nan_to_num(1.0).mean()))
    return {"rates": list(rates), "trajectory_soft_error": trajectory_mean, "final_soft_error": final}


def _validation_soft_error(summary: dict) -> float | None:
    """The validation soft error of the evaluation's fresh runs after their last step (what a choice
    between settings of the method may read; the test split stays unread)."""
    steps = (summary.get("eval") or {}).get("steps") or []
    return steps[-1].get("outer_loss") if steps else None


def grids(seeds: list[int]) -> dict[int, dict]:
    """Each seed's grid of fixed rates (test accuracy after 1,000 steps), from results/online_lr.json."""
    found = {}
    for row in read(RESULTS / "online_lr.json")["rows"]:
        if row.get("grid") and row["seed"] in seeds:
            found.setdefault(row["seed"], row["grid"])
    return found


def table(result: dict[str, Any]) -> str:
    header = ["method", "start", "final rate (mean ± std)", "rate over the last third: median [min, max] over seeds",
              "validation soft error, fresh 1,000-step runs at the final rate",
              "test accuracy %, the same runs", "best fixed rate (validation): test %",
              "inner steps", "seeds", "stopped as diverged"]
    by_seed = {int(seed): grid for seed, grid in result["grids"].items()}
    lines = []
    for method in ("pes", "pes_sigma_0.3", "pes_noise_reuse", "es", "exact"):
        for start in LR_STARTS:
            rows = [r for r in result["rows"] if r["method"] == method and r["start"] == start]
            if not rows:
                continue
            rates = [r["final_rate"] for r in rows]
            accuracy = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
            chosen = [by_seed[r["seed"]] for r in rows if r["seed"] in by_seed]
            best = [grid["test_accuracy"][_best(grid)] for grid in chosen]
            best_rates = sorted({f"{grid['lrs'][_best(grid)]:g}" for grid in chosen})
            soft = [r["validation_soft_error"] for r in rows if r.get("validation_soft_error") is not None]
            lines.append([method, f"{start:g}", f"{statistics.mean(rates):.3g} ± "
                          f"{statistics.stdev(rates) if len(rates) > 1 else 0:.2g}",
                          f"{statistics.median(r['last_third_median'] for r in rows):.3g} "
                          f"[{min(r['last_third_min'] for r in rows):.3g}, {max(r['last_third_max'] for r in rows):.3g}]",
                          f"{statistics.mean(soft):.4f}" if soft else "-",
                          f"{100 * statistics.mean(accuracy):.1f} ± "
                          f"{100 * (statistics.stdev(accuracy) if len(accuracy) > 1 else 0):.1f}" if accuracy else "-",
                          f"{', '.join(best_rates)}: {100 * statistics.mean(best):.1f}" if best else "-",
                          f"{rows[0]['inner_steps']:,}", str(len(rows)),
                          str(sum(r["status"] == "diverged" for r in rows))])
    return markdown_table(header, lines)


def schedule_table(result: dict[str, Any]) -> str:
    """The five-block schedule learned by PES: each block's rate (mean over seeds) and the test accuracy."""
    rows = [r for r in result["rows"] if r["method"] == "pes_schedule"]
    if not rows:
        return "(not measured)\n"
    lines = []
    for start in sorted({r["start"] for r in rows}):
        mine = [r for r in rows if r["start"] == start]
        blocks = [statistics.mean(r["final_rates"][i] for r in mine) for i in range(len(mine[0]["final_rates"]))]
        accuracy = [r["test_accuracy"] for r in mine if r["test_accuracy"] is not None]
        lines.append([f"{start:g}", ", ".join(f"{rate:.3g}" for rate in blocks),
                      f"{100 * statistics.mean(accuracy):.1f} ± "
                      f"{100 * (statistics.stdev(accuracy) if len(accuracy) > 1 else 0):.1f}",
                      ", ".join(f"{100 * a:.1f}" for a in accuracy), f"{mine[0]['inner_steps']:,}", str(len(mine))])
    return markdown_table(["start", "learned rates of the five 200-step blocks (mean over seeds)",
                           "test accuracy %, fresh 1,000-step runs", "per seed", "inner steps", "seeds"], lines)


def objective_table(result: dict[str, Any]) -> str:
    found = result["objective"]
    return markdown_table(["fixed rate", *[f"{rate:g}" for rate in found["rates"]]], [
        ["validation soft error along the run (every 10 steps, averaged): PES's objective",
         *[f"{value:.4f}" for value in found["trajectory_soft_error"]]],
        ["validation soft error after 1,000 steps", *[f"{value:.4f}" for value in found["final_soft_error"]]]])


def figure(result: dict[str, Any], path: Path = FIGURE) -> Path:
    """Every run's rate against the outer steps, per method and start, with the best fixed rate."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4.4))
    axes = fig.subplots()
    colors = {"pes": "C0", "pes_sigma_0.3": "C2", "pes_noise_reuse": "C4", "es": "C3"}  # the exact runs' 40 steps would not show
    for row in (r for r in result["rows"] if r["method"] in colors):
        label = f"{row['method']} from {row['start']:g}" if row["seed"] == min(r["seed"] for r in result["rows"]) else None
        axes.plot([p["iteration"] for p in row["trajectory"]], [p["rate"] for p in row["trajectory"]],
                  color=colors[row["method"]], linestyle="-" if row["start"] < 1 else "--", alpha=0.8, label=label)
    best = [grid["lrs"][_best(grid)] for grid in result["grids"].values()]
    return finish_rate_figure(fig, axes, best, "outer step",
                              "One rate on MNIST-1D, horizon 1,000: PES against truncated ES (each seed a line)", path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pes", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["pes", "es"], choices=list(METHODS))
    parser.add_argument("--starts", type=float, nargs="+", default=list(LR_STARTS))
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--objective", action="store_true", help="only the objective at fixed rates, added to the "
                        "result file")
    parser.add_argument("--runs-dir", default="runs/pes_study")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    out = Path(args.out) if args.out else RESULTS / "pes_lr.json"
    if args.objective:
        result = read(out)
        result["objective"] = objective()
        command = "python -m benchmarks.pes --objective"
        result["commands"] = [c for c in result["commands"] if c != command] + [command]
        result["command"] = "; ".join(result["commands"])
        write(result, out)
        print(objective_table(result))
        return 0
    rows = []
    for method in args.methods:
        for start in args.starts:
            for seed in args.seeds:
                row = run_seed(method, start, seed, Path(args.runs_dir), args.iterations)
                rows.append(row)
                print(f"{method} from {start:g} seed {seed}: rate {row['final_rate']:.4g}, test "
                      f"{row['test_accuracy']}", flush=True)
    if out.exists():  # rows of other methods or starts measured by another command stay beside these
        earlier = read(out)
        kept = [r for r in earlier["rows"] if (r["method"], r["start"]) not in {(m, s) for m in args.methods
                                                                                  for s in args.starts}]
        rows = kept + rows
        commands = [c for c in earlier.get("commands", [earlier.get("command")]) if c]
        kept_objective = earlier.get("objective")
    else:
        commands, kept_objective = [], None
    given = [a for i, a in enumerate(argv if argv is not None else sys.argv[1:])]
    if "--runs-dir" in given:
        at = given.index("--runs-dir")
        del given[at:at + 2]
    commands.append(f"python -m benchmarks.pes {' '.join(given)}".strip())
    result = {"rows": rows, "grids": grids(sorted({r["seed"] for r in rows})), "benchmark": "pes",
              "commands": commands, "command": "; ".join(commands), "machine": machine(torch.device("cpu")),
              "wall_seconds": time.perf_counter() - started}
    if kept_objective is not None:
        result["objective"] = kept_objective
    write(result, out)
    if out == RESULTS / "pes_lr.json":  # the figure shows the results' file, not a scratch one
        figure(result)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
