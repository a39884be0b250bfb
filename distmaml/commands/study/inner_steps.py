"""The inner-steps study: how the number of inner steps K trades accuracy, over-fitting, time and memory.

For each K and each mode (second order with activation checkpointing, first order) it trains the
config for a fixed number of iterations in a fresh process (so peak memory is that run's alone),
then reads the run's summary: post-adaptation query and support MSE on fresh tasks after K steps,
seconds per iteration and peak memory, or that the run diverged. Results: study.json, study.md (a
Markdown table), study.png.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from distmaml.commands.study.runs import train_runs
from distmaml.files import write_figure, write_text
from distmaml.run.log import strict_json

MODES = {"second_order": ["inner.mode=second_order", "inner.checkpoint=auto"],
         "first_order": ["inner.mode=first_order"]}


def run_inner_steps_study(config_path: str | Path, out_dir: str | Path, steps: list[int], modes: list[str],
                          iterations: int, overrides: list[str] | None = None) -> list[dict[str, Any]]:
    """Train every (K, mode) pair and collect one row of results for each."""
    out_dir = Path(out_dir)
    rows = []
    for mode in modes:
        for k in steps:
            run_dir = out_dir / f"{mode}_k{k}"
            settings = [*(overrides or []), *MODES[mode], f"inner.steps={k}", f"eval.steps={k}",
                        f"train.iterations={iterations}", f"run.dir={run_dir}", "logging.progress=false",
                        "train.checkpoint_every=0"]
            train_runs(config_path, [settings], [run_dir])
            summary = json.loads((run_dir / "summary.json").read_text())
            # A run that diverged in training has no model to evaluate: its numbers are NaN (null).
            after = summary["eval"]["steps"][-1] if "eval" in summary else {}
            rows.append({"mode": mode, "inner_steps": k, "status": summary["status"],
                         "diverged_at": summary.get("diverged_at"), "query_mse": after.get("loss", math.nan),
                         "query_mse_ci95": after.get("loss_ci95", math.nan),
                         "query_mse_median": after.get("loss_median", math.nan),
                         "diverged": after.get("diverged", 0), "support_mse": after.get("support_loss", math.nan),
                         "seconds_per_iteration": summary["seconds_per_iteration"],
                         "peak_memory_mb": summary["peak_memory_mb"]})
            print(format_row(rows[-1]), flush=True)
    write_text(out_dir / "study.json", strict_json(rows))
    write_text(out_dir / "study.md", format_table(rows, iterations) + "\n")
    plot_study(rows, out_dir / "study.png")
    return rows


HEADER = ("| mode | K | query MSE after K steps (95% CI) | median | support MSE after K steps | "
          "s / iteration | peak memory (MB) |\n|---|---|---|---|---|---|---|")


def format_row(row: dict[str, Any]) -> str:
    if row.get("diverged_at") is not None:
        query = f"diverged in training (iteration {row['diverged_at']})"
    elif row.get("status") == "diverged" or row["diverged"]:
        query = f"diverged ({row['diverged']} tasks)"
    else:
        query = f"{row['query_mse']:.3f} ± {row['query_mse_ci95']:.3f}"
    return (f"| {row['mode']} | {row['inner_steps']} | {query} | {_number(row['query_mse_median'])} | "
            f"{_number(row['support_mse'])} | {row['seconds_per_iteration']:.4f} | {row['peak_memory_mb']:.0f} |")


def _number(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "diverged"


def format_table(rows: list[dict[str, Any]], iterations: int) -> str:
    return "\n".join([f"{iterations} meta-iterations per run.\n", HEADER, *map(format_row, rows)])


def plot_study(rows: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for mode in dict.fromkeys(row["mode"] for row in rows):
        mine = [row for row in rows if row["mode"] == mode]
        k = [row["inner_steps"] for row in mine]
        axes[0].plot(k, [r["query_mse_median"] for r in mine], marker="o", label=f"{mode}: query (median)")
        axes[0].plot(k, [r["support_mse"] for r in mine], ls="--", marker="x", label=f"{mode}: support")
        axes[1].plot(k, [r["seconds_per_iteration"] for r in mine], marker="o", label=mode)
        axes[2].plot(k, [r["peak_memory_mb"] for r in mine], marker="o", label=mode)
    for axis, title in zip(axes, ("MSE after K steps (fresh tasks)", "seconds per meta-iteration",
                                  "peak memory (MB)")):
        axis.set_xscale("log")
        axis.set_xlabel("inner steps K")
        axis.set_title(title)
        axis.legend(fontsize=8)
    figure.tight_layout()
    write_figure(out, figure, dpi=110)
    plt.close(figure)
