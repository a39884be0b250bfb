"""The seeds study: does a config's result hold for every user who runs it, or for one lucky seed?

    distmaml study seeds configs/sine_maml.yaml --seeds 0 1 2 3 4 --threads 1 2 --jobs 2

trains the config once per (training seed, CPU thread count) in fresh processes, then evaluates
every final model on the SAME fresh tasks (eval.seed) after 0..S inner steps at each number of
shots, counting diverged tasks, and reads each run's logged meta-loss and sharpness (the top
Hessian eigenvalue of the support loss at theta) over training. Results: seeds.json (everything),
seeds.md (mean ± std over runs, and one row per run), seeds.png (sharpness over training). A run
that diverged in training is reported as such (its last good checkpoint is not evaluated in its
place), and makes every statistic over runs "diverged".

Few-shot tasks are evaluated at each number of shots: a run's "eval" and the report's "over_runs"
are keyed by it ("5", "10"). Tasks without shots (training runs on a fixed data set, the family's
`episodic` False) have one evaluation: "shots" is null, a run's "eval" is that evaluation and
"over_runs" its rows.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Any

import torch

from distmaml.commands.study.runs import train_runs
from distmaml.files import write_figure, write_text
from distmaml.run.log import strict_json
from distmaml.tasks.protocol import is_episodic

REPORTED_STEPS = (1, 5, 10)  # the MAML paper's sine protocol reports these
# Few-shot tasks are evaluated as the MAML paper's sine protocol does, unless the study says otherwise.
DEFAULT_SHOTS, DEFAULT_STEPS = (5, 10), 10


def reported_steps(steps: int) -> list[int]:
    """The paper's reported steps up to `steps`, and `steps` itself (a 3-step Omniglot study shows step 3)."""
    return sorted({s for s in REPORTED_STEPS if s <= steps} | {steps} - {0})


def study_evaluation(config, shots: list[int] | None, steps: int | None) -> tuple[list[int] | None, int]:
    """The numbers of shots (None: tasks without shots) and inner steps a study of `config` evaluates at:
    those given, else DEFAULT_SHOTS after DEFAULT_STEPS for few-shot tasks, and for training runs the
    config's eval.steps (what its runs evaluate). Shots or query examples asked of training runs
    (--shots, eval.shots, eval.query) are refused in one line, before anything is trained."""
    from distmaml.evaluate import refuse_shots
    from distmaml.imports import resolve
    from distmaml.tasks import FAMILIES

    family = resolve(config.task.family, FAMILIES, "task.family")  # the class: `episodic` is a class attribute
    if is_episodic(family):
        return list(shots or DEFAULT_SHOTS), DEFAULT_STEPS if steps is None else steps
    refuse_shots(family, {"shots": shots}, {"shots": "--shots"}, config.task.family)
    refuse_shots(family, {"shots": config.eval.shots, "query": config.eval.query},
                 {"shots": "eval.shots", "query": "eval.query"}, config.task.family)
    return None, config.eval.steps if steps is None else steps


def run_seeds_study(config_path: str | Path, out_dir: str | Path, seeds: list[int], threads: list[int],
                    shots: list[int] | None = None, steps: int | None = None, tasks: int = 600, jobs: int = 1,
                    overrides: list[str] | None = None) -> dict[str, Any]:
    """Train every (seed, threads) pair, evaluate each on the same tasks, write and return the results.

    `shots` and `steps` default as `study_evaluation` says. A run directory that already holds a
    finished run is evaluated again without retraining (the trainer resumes from its checkpoint and
    has nothing left to do), so a study can be extended or re-reported cheaply.
    """
    from distmaml.config import load_config

    config = load_config(config_path, overrides)
    shots, steps = study_evaluation(config, shots, steps)
    out_dir = Path(out_dir)
    runs = [(seed, count) for count in threads for seed in seeds]
    run_dirs = {run: out_dir / f"threads{run[1]}_seed{run[0]}" for run in runs}
    statuses = train_runs(config_path, [[*(overrides or []), f"train.seed={seed}", f"engine.threads={count}",
                                         f"run.dir={run_dirs[seed, count]}", "logging.progress=false",
                                         "eval.at_end=false"] for seed, count in runs],
                          [run_dirs[run] for run in runs], jobs=jobs, log_dir=out_dir / "logs")
    results = [evaluate_run(run_dirs[run], run[0], run[1], shots, steps, tasks) if status != "diverged" else
               diverged_run(run_dirs[run], run[0], run[1]) for run, status in zip(runs, statuses)]
    evaluated = [next(iter(_by_shots(result["eval"], shots).values())) for result in results
                 if result["eval"] is not None]
    metric = "accuracy" if evaluated and "accuracy" in evaluated[0]["steps"][0] else "loss"
    command = " ".join(["distmaml study seeds", str(config_path), *(overrides or []), "--seeds", *map(str, seeds),
                        "--threads", *map(str, threads), *(["--shots", *map(str, shots)] if shots else []),
                        "--steps", str(steps), "--tasks", str(tasks)])
    report = {"command": command, "config": str(config_path), "overrides": overrides or [], "shots": shots,
              "steps": steps, "inner_steps": config.inner.steps, "tasks": tasks, "metric": metric,
              "outer": evaluated[0].get("outer", "query") if evaluated else "query", "runs": results,
              "over_runs": over_runs(results, shots, steps, metric)}
    write_text(out_dir / "seeds.json", strict_json(report))
    write_text(out_dir / "seeds.md", format_report(report) + "\n")
    plot_sharpness(results, out_dir / "seeds.png")
    return report


def _by_shots(value: Any, shots: list[int] | None) -> dict[str, Any]:
    """A run's evaluations, or the rows over runs, by number of shots ({"5": ..., "10": ...}); for tasks
    without shots the one evaluation (or its rows) as {"": ...}."""
    return value if shots is not None else {"": value}


def evaluate_run(run_dir: Path, seed: int, threads: int, shots: list[int] | None, steps: int,
                 tasks: int) -> dict[str, Any]:
    """One finished run: its evaluation at each number of shots (or its one evaluation, for tasks
    without shots) and what it logged while training."""
    from distmaml.evaluate import evaluate, evaluation_settings
    from distmaml.run.restore import load_trained

    torch.set_num_threads(1)
    config, learner, _ = load_trained(run_dir)
    settings = {**evaluation_settings(config), "steps": steps, "tasks": tasks}

    def at(count: int | None) -> dict[str, Any]:
        return evaluate(learner.problem, learner.theta, learner.family, learner.inner, **{**settings, "shots": count})

    evaluations = {str(count): at(count) for count in shots} if shots is not None else at(None)
    return {"seed": seed, "threads": threads, "run_dir": str(run_dir), "status": "complete",
            "inner_lr": config.inner.lr, **_logged(run_dir), "eval": evaluations}


def diverged_run(run_dir: Path, seed: int, threads: int) -> dict[str, Any]:
    """A run that diverged in training: what it logged, where it diverged, and no evaluation."""
    from distmaml.config import load_config

    summary = json.loads((run_dir / "summary.json").read_text())
    config = load_config(run_dir / "config.yaml")
    return {"seed": seed, "threads": threads, "run_dir": str(run_dir), "status": "diverged",
            "diverged_at": summary.get("diverged_at"), "error": summary.get("error"), "inner_lr": config.inner.lr,
            **_logged(run_dir), "eval": None}


def _logged(run_dir: Path) -> dict[str, Any]:
    """What a run logged while training (NaN where it logged nothing: a run that diverged at once)."""
    path = run_dir / "metrics.jsonl"
    logged = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    first, last = (logged[0], logged[-1]) if logged else ({}, {})
    return {"meta_loss_first": first.get("meta_loss", math.nan), "meta_loss_last": last.get("meta_loss", math.nan),
            "first_window_end": first.get("iteration"), "iterations": last.get("iteration"),
            "s_per_iteration": statistics.median(m["s_per_iteration"] for m in logged) if logged else math.nan,
            "sharpness": [(m["iteration"], m.get("sharpness", math.nan)) for m in logged]}


def check_evaluation(config, shots: list[int] | None, steps: int, tasks: int) -> None:
    """Refuse, before any run is trained, an evaluation (--tasks, --shots) that would not fit in memory."""
    from distmaml.build import DTYPES
    from distmaml.engine import memory
    from distmaml.engine.preflight import shapes_only
    from distmaml.tasks import build_task_family

    learner = shapes_only(config, build_task_family(config, "cpu", DTYPES[config.engine.dtype][0]))
    if learner is None:  # a model that cannot be built without memory: its runs' own checks remain
        return
    for count in shots if shots is not None else [None]:
        memory.check_evaluation_fits(learner.problem, learner.theta, learner.family, learner.inner,
                                     {"tasks": tasks, "shots": count, "query": config.eval.query, "steps": steps},
                                     config, torch.device("cpu"), {"tasks": "--tasks", "shots": "--shots",
                                                                   "query": "eval.query"})


def over_runs(results: list[dict[str, Any]], shots: list[int] | None, steps: int,
              metric: str = "loss") -> dict[str, list[dict[str, Any]]] | list[dict[str, Any]]:
    """Per number of shots and reported number of inner steps: mean and standard deviation over runs of
    each run's mean query loss (or accuracy; NaN where any run diverged), the runs' medians, and
    diverged tasks in all. For tasks without shots, the one list of rows."""
    from distmaml.evaluate import report_steps

    table: dict[str, list[dict[str, Any]]] = {}
    for count in [""] if shots is None else map(str, shots):
        per_run_rows = [_by_shots(result["eval"], shots)[count]["steps"] for result in results
                        if result["eval"] is not None]
        # Every run reports the same numbers of steps (every one up to 20, else eleven of them).
        counts = [row["step"] for row in per_run_rows[0]] if per_run_rows else report_steps(steps)
        rows = []
        for index, step in enumerate(counts):
            per_run = [run_rows[index] for run_rows in per_run_rows]
            untrained = len(results) - len(per_run)  # runs that diverged in training
            means = [row[metric] for row in per_run]
            clean = (not untrained and all(math.isfinite(m) for m in means)
                     and not any(row["diverged"] for row in per_run))
            rows.append({"step": step,
                         "mean": statistics.fmean(means) if clean else math.nan,
                         "std": statistics.stdev(means) if clean and len(means) > 1 else (0.0 if clean else math.nan),
                         "median_of_medians": (statistics.median(row[f"{metric}_median"] for row in per_run)
                                               if per_run else math.nan),
                         "diverged_tasks": sum(row["diverged"] for row in per_run),
                         "runs_with_divergence": untrained + sum(1 for row in per_run if row["diverged"])})
        table[count] = rows
    return table if shots is not None else table[""]


def _cell(value: float, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if math.isfinite(value) else "diverged"


def shown_steps(report: dict[str, Any], counts: list[int]) -> list[int]:
    """The numbers of inner steps the report's tables show, of those evaluated (`counts`): 0, and for
    few-shot tasks the paper's reported steps and S; for training runs S, and the steps the runs
    trained (inner.steps) where the evaluation went past them."""
    steps = report["steps"]
    if report["shots"] is not None:
        wanted = set(reported_steps(steps))
    else:
        trained = report.get("inner_steps")
        wanted = {steps} | ({trained} if trained is not None and 0 < trained < steps else set())
    return [0, *sorted(step for step in wanted if step in counts and step)]


def format_report(report: dict[str, Any]) -> str:
    runs, steps, metric, shots = report["runs"], report["steps"], report.get("metric", "loss"), report["shots"]
    what = f"{report.get('outer', 'query')} {'accuracy' if metric == 'accuracy' else 'loss'}"
    over = _by_shots(report["over_runs"], shots)
    shown = shown_steps(report, [row["step"] for row in next(iter(over.values()))])
    evaluated = (f"the same {report['tasks']} fresh tasks (eval.seed)" if shots is not None else
                 f"the same {report['tasks']} fresh training runs of {steps} inner steps (eval.seed)")
    lines = [f"{len(runs)} runs of {report['config']} {' '.join(report['overrides'])}".rstrip() + "; "
             f"evaluated on {evaluated}, {what}.", ""]
    notes = [f"- seed {run['seed']}, {run['threads']} thread(s): {note}." for run in runs if run["eval"] is not None
             for note in [next(iter(_by_shots(run["eval"], shots).values())).get("beyond_trained_steps")] if note]
    if notes:
        lines += [f"Past the {report.get('inner_steps')} inner steps the runs trained:", *notes, ""]
    first = ["shots"] if shots is not None else []
    lines += [f"Over runs: mean ± std of the runs' mean {what} (diverged where any task of any run diverged); "
              "diverged tasks in all runs.", "",
              "| " + " | ".join([*first, *(f"{s} steps" for s in shown)]) + " | diverged tasks (runs) at each step |",
              "|" + "---|" * (len(first) + len(shown) + 1)]
    for count, rows in over.items():
        at = {row["step"]: row for row in rows}
        cells = [f"{_cell(at[s]['mean'])} ± {_cell(at[s]['std'])}" if math.isfinite(at[s]["mean"])
                 else f"diverged (median {_cell(at[s]['median_of_medians'])})" for s in shown]
        counts = ", ".join(f"{at[s]['diverged_tasks']} ({at[s]['runs_with_divergence']})" for s in shown)
        lines.append("| " + " | ".join([*([count] if shots is not None else []), *cells]) + f" | {counts} |")
    lines += ["", f"Per run ({what} mean, or the number of diverged tasks; sharpness = top Hessian eigenvalue of "
              "the support loss at theta, mean over the meta-batch, at the last log step and the largest seen; "
              "inner SGD steps at inner.lr are unstable above 2 / inner.lr):", ""]
    header = ["seed", "threads"] + [f"{c}-shot, {s} steps" if c else f"{s} steps" for c in over for s in shown[1:]]
    header += ["sharpness (last / max)", "2 / inner.lr", "meta-loss first → last window", "s / iteration"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for run in runs:
        cells = [str(run["seed"]), str(run["threads"])]
        for count in over:
            for step in shown[1:]:
                if run["eval"] is None:
                    cells.append(f"diverged in training (iteration {run['diverged_at']})")
                    continue
                row = next(row for row in _by_shots(run["eval"], shots)[count]["steps"] if row["step"] == step)
                cells.append(_cell(row[metric]) if not row["diverged"] else f"{row['diverged']} diverged")
        values = [value for _, value in run["sharpness"] if math.isfinite(value)]
        cells.append(f"{values[-1]:.0f} / {max(values):.0f}" if values else "not logged")
        cells += [f"{2 / run['inner_lr']:.0f}", f"{_cell(run['meta_loss_first'])} → {_cell(run['meta_loss_last'])}",
                  _cell(run["s_per_iteration"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_sharpness(results: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4))
    for run in results:
        points = [(i, v) for i, v in run["sharpness"] if math.isfinite(v)]
        if points:
            axis.plot(*zip(*points), lw=1.2, label=f"seed {run['seed']}, {run['threads']} thread(s)")
    if results:
        axis.axhline(2 / results[0]["inner_lr"], color="black", ls="--", lw=1, label="2 / inner.lr (stability limit)")
    axis.set_xlabel("meta-iteration")
    axis.set_ylabel("top Hessian eigenvalue of the support loss")
    axis.legend(fontsize=7)
    figure.tight_layout()
    write_figure(out, figure, dpi=110)
    plt.close(figure)
