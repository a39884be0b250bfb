"""The tables of the bi-level problems beyond MAML: MNIST-1D's pipeline check, the hyperparameter
and learned-data hypergradients against the peers, long unrolls, and each problem over seeds."""

from __future__ import annotations

import math
import re
import statistics
from typing import Any

from benchmarks import common
from benchmarks.common import read
from benchmarks.tables import finite as _finite, markdown_table as _table, number as _ms, source as _source


def mnist1d_baselines() -> str:
    """Plain training of MNIST-1D's MLP and CNN on distmaml's data and models, against the published accuracies."""
    result = read(common.RESULTS / "mnist1d_baselines.json")
    rows = [[r["model"], ", ".join(f"{100 * a:.1f}" for a in r["test_accuracy"]),
             f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}", f"{100 * r['published']:.0f}"] for r in result["rows"]]
    seeds = ", ".join(map(str, result["rows"][0]["seeds"])) if result["rows"] else ""
    return (_table(["model", f"test accuracy % (seeds {seeds})", "mean ± std", "published %"], rows)
            + _source(result, f"{result['steps']:,} Adam steps per run, see the benchmark's docstring"))


SOLVE_LABELS = {"cg": "CG, 20 iterations, ridge 1", "neumann": "Neumann series, 20 terms",
                "cg-undamped": "CG, 20 iterations, no ridge"}


def peers_hyper() -> str:
    """Hyperparameter and learned-data hypergradients against TorchOpt, higher and Betty (benchmarks.peers_hyper)."""
    result = read(common.RESULTS / "peers_hyper_cpu.json")
    timed = [r for r in result["rows"] if "peak_mib" not in r]
    memory_rows = [r for r in result["rows"] if "peak_mib" in r]
    rows = []
    for r in timed:
        error = r.get("relative_error")
        ms = r.get("ms_per_hypergradient")
        distmaml = next((d for d in timed if d["case"] == r["case"] and d["library"].startswith("distmaml")
                         and d.get("solve") == r.get("solve")), {})
        ratio = (f"{ms / distmaml['ms_per_hypergradient']:.1f}×"
                 if ms is not None and distmaml.get("ms_per_hypergradient") else "")
        status = "fails (below)" if "error" in r else r["status"]
        rows.append([r["case"], str(r["inner_steps"]), r["library"], r.get("how", ""),
                     SOLVE_LABELS.get(r.get("solve"), "unrolled"), status,
                     f"{error:.1e}" if error is not None else "–", _ms(ms), ratio])
    text = _table(["problem", "T", "library", "how", "hypergradient by", "result", "relative difference (float64)",
                   "ms (float32)", "× distmaml"], rows)
    failures: dict[tuple[str, str], list[str]] = {}  # (library, error): the cases it failed on
    for r in timed:
        if "error" in r:
            failures.setdefault((r["library"], r["error"]), []).append(r["case"])
    text += "".join(f"\n{library}, {', '.join(cases)}: {why}\n" for (library, why), cases in failures.items())
    if memory_rows:
        memory_table = []
        for r in memory_rows:
            mine = next(d for d in memory_rows if d["case"] == r["case"] and d["library"] == "distmaml")
            own = r.get("unroll_mib")
            memory_table.append([r["case"], f"{r['inner_steps']:,}", r["library"], r.get("how", ""),
                                 f"{r['peak_mib']:.0f}", f"{r['peak_mib_one_step']:.0f}" if own is not None else "–",
                                 f"{own:.0f}" if own is not None else "–",
                                 f"{own / mine['unroll_mib']:.1f}×" if own is not None and mine.get("unroll_mib")
                                 else ""])
        text += "\n" + _table(["problem", "T", "library", "unroll", "peak memory above baseline (MiB)",
                               "the same at T = 1", "the unroll's own (MiB)", "× distmaml"], memory_table)
    tasks = f"; {timed[0]['tasks']} random initialisations per hypergradient" if timed else ""
    return text + (f"\nA library's hypergradient must equal distmaml's (relative difference "
                   f"≤ {result['tolerance']:g}, float64) before it is timed{tasks}." + _source(result))


def unrolls() -> str:
    """Memory, time and spread of a learning-rate hypergradient against the unroll length T (benchmarks.unrolls)."""
    result = read(common.RESULTS / "unrolls_cpu.json")
    rates = [s["rate"] for s in result["rows"][0]["spread"]] if result["rows"] else []
    rows = []
    for r in result["rows"]:
        cells = [f"{r['inner_steps']:,}"]
        for plan in ("none", "auto"):
            cells += [f"{r[plan]['peak_mib']:.0f}", f"{r[plan]['seconds']:.2f}"]
        for spread in r["spread"]:
            mean, std = _finite(spread["mean"]), _finite(spread["std"])
            cell = f"{mean:+.3g} ± {std:.3g}" if math.isfinite(mean) else "not finite"
            if spread["finite"] < result["tasks"]:
                cell += f" ({spread['finite']} of {result['tasks']} finite)"
            cells.append(cell)
        rows.append(cells)
    header = ["T", "stored: MiB", "stored: s", "recomputed (√T segments): MiB", "recomputed: s",
              *[f"d L_val / d log lr at lr {rate:g}: mean ± std" for rate in rates]]
    return (_table(header, rows) + f"\nOne hypergradient over {result['tasks']} random initialisations of "
            "configs/mnist1d_lr.yaml's network; memory is the peak resident memory above a fresh process's "
            "baseline; mean ± std over the initialisations of each one's own hypergradient (float64)."
            + _source(result, "see the benchmark's docstring"))


# benchmarks/results/hyper_<name>.json (benchmarks.hyper_seeds): one table each in docs/results.md
HYPER = ("learning_rate", "learning_rate_truncated", "learning_rate_cross_entropy", "learning_rate_schedule",
         "activation", "weight_decay", "logistic", "digits_hyperclean", "digits_hyperclean_mean", "mnist1d_hyperclean",
         "mnist1d_hyperclean_mean", "digits_distill", "digits_distill_m10", "mnist1d_distill")
_CHOSEN = re.compile(r"^(?P<label>.*?)(?P<value>[-+]?\d[\d.]*(?:e[-+]?\d+)?)\)$")


def _summary(value: Any) -> str:
    """A learned value as a report line states it: a number, or a long list by its range and median."""
    if isinstance(value, (int, float)):
        return f"{value:.3g}"
    while isinstance(value, list) and value and all(isinstance(v, list) for v in value):  # a matrix: its entries
        value = [entry for row in value for entry in row]
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) for v in value):
        if len(value) <= 8:  # a schedule's few blocks: every value, in order
            return "[" + ", ".join(f"{v:.3g}" for v in value) + "]"
        ordered = sorted(value)
        return (f"{len(value):,} values from {ordered[0]:.3g} to {ordered[-1]:.3g}, median "
                f"{ordered[len(ordered) // 2]:.3g}")
    if isinstance(value, dict):
        return ", ".join(f"{key}: {_summary(inner)}" for key, inner in value.items())
    return str(value)


def _config(result: dict[str, Any]) -> str:
    """The config a result ran, with the overrides it was given."""
    return result["config"] + (" " + " ".join(result["overrides"]) if result.get("overrides") else "")


def hyper(name: str) -> str:
    """Learned hyperparameters or data over training seeds against their baselines (benchmarks.hyper_seeds)."""
    result = read(common.RESULTS / f"hyper_{name}.json")
    runs = result["rows"]
    variants: dict[str, list[str]] = {"learned (this config)": ["learned run"] * len(runs)}
    for index, run in enumerate(runs):
        for key in run["baselines"]:
            match = _CHOSEN.match(key)
            label = f"{match.group('label')}v)" if match else key
            variants.setdefault(label, [""] * len(runs))[index] = key
    rows = []
    for label, keys in variants.items():
        accuracies, losses, cells = [], [], []
        for run, key in zip(runs, keys):
            found = run["learned_run"] if key == "learned run" else run["baselines"].get(key)
            if not found:
                cells.append("–")
                continue
            accuracy, loss = _finite(found.get("test_accuracy")), _finite(found.get("validation_loss"))
            match = _CHOSEN.match(key)
            cells.append((f"{100 * accuracy:.1f}" if math.isfinite(accuracy) else "–")
                         + (f" (v = {match.group('value')})" if match else ""))
            if math.isfinite(accuracy):
                accuracies.append(accuracy)
            if math.isfinite(loss):
                losses.append(loss)
        std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
        spread = f"{100 * statistics.fmean(accuracies):.1f} ± {100 * std:.1f}" if accuracies else "–"
        rows.append([label, *cells, spread, f"{statistics.fmean(losses):.4f}" if losses else "–"])
    header = ["variant", *[f"test accuracy %, seed {run['seed']}" for run in runs], "mean ± std",
              "validation loss (mean)"]
    lines = [_table(header, rows)]
    for run in runs:
        learned = {key: value for key, value in run.get("learned", {}).items() if key not in run}  # said below
        parts = [f"learned {_summary(learned)}"] if learned else []
        if "flip_detection" in run:
            parts.append(f"flipped labels found: {_summary(run['flip_detection'])}")
        if "baseline_lr" in run:
            parts.append(f"baselines' tuned rates: {_summary(run['baseline_lr'])}")
        parts.append(f"training {run['train_seconds']:.0f} s")
        lines.append(f"- seed {run['seed']}: " + "; ".join(parts))
    config = _config(result)
    grids = any(_CHOSEN.match(key) for keys in variants.values() for key in keys)
    chosen = "; v: the value a grid chose for that seed" if grids else ""
    return ("\n".join(lines) + f"\n\nConfig: {config}{chosen}. "
            + _source(result, "see the benchmark's docstring").lstrip("\n"))


def hyper_methods(name: str) -> str:
    """One problem's hypergradient by each method: its cost and its distance from the unrolled one
    (benchmarks.hyper_methods)."""
    result = read(common.RESULTS / f"hyper_methods_{name}.json")
    rows = [[r["method"], f"{r['inner_steps']:,}", str(r["tasks"]), f"{r['seconds_per_outer_step']:.2f}",
             f"{r['cosine_to_unrolled']:+.3f}" if "cosine_to_unrolled" in r else "–",
             f"{r['norm_ratio_to_unrolled']:.3f}" if "norm_ratio_to_unrolled" in r else "–"] for r in result["rows"]]
    config = _config(result)
    return (_table(["method", "T", "tasks", "s per outer step", "cosine to unrolled", "norm ÷ unrolled's"], rows)
            + f"\nConfig: {config}. " + _source(result, "medians, see the benchmark's docstring").lstrip("\n"))


def headline_rows() -> tuple[list[list[str]], list[str]]:
    """The README headline's rows for learned data and hyperparameters, and the result files they come from
    (only those that exist)."""
    rows, files = [], []

    def accuracy(result, get) -> list[float]:
        return [100 * get(row) for row in result["rows"]]

    def baseline(result, name) -> float:  # `name`, or else the one baseline whose name starts with it
        def value(row):
            (key,) = [name] if name in row["baselines"] else [key for key in row["baselines"] if key.startswith(name)]
            return row["baselines"][key]["test_accuracy"]

        return statistics.mean(accuracy(result, value))

    for name, label, others in (
            ("hyper_digits_hyperclean", "hyper-cleaning on scikit-learn's digits, half the training labels flipped: "
             "test accuracy with learned example weights / training on every label / on only the correct ones",
             ("noisy", "oracle")),
            ("hyper_mnist1d_hyperclean", "the same on MNIST-1D (300 SGD steps of an MLP, 3,600 training sequences)",
             ("noisy", "oracle")),
            ("hyper_digits_distill", "dataset distillation on scikit-learn's digits, one learned example per class, "
             "30 steps from random initialisations: test accuracy / one random real example per class",
             ("random_real",)),
            ("hyper_learning_rate_schedule", "a learned learning-rate schedule (5 blocks of 200 SGD steps) on "
             "MNIST-1D: test accuracy / the best of 16 fixed rates by validation accuracy",
             ("SGD rate grid (best by validation accuracy,",))):
        path = common.RESULTS / f"{name}.json"
        if not path.exists():
            continue
        result = read(path)
        learned = accuracy(result, lambda row: row["learned_run"]["test_accuracy"])
        spread = statistics.stdev(learned) if len(learned) > 1 else 0.0
        cells = [f"{statistics.mean(learned):.1f} ± {spread:.1f} %"] + [f"{baseline(result, o):.1f} %" for o in others]
        rows.append([f"{label}, mean ± std over {len(learned)} training seeds", " / ".join(cells)])
        files.append(path.name)
    path = common.RESULTS / "peers_hyper_cpu.json"
    if path.exists():
        result = read(path)
        # distmaml's batched rows (CG and Neumann); its per-task loop has a row of its own below.
        batched = [row for row in result["rows"] if row["library"] != "distmaml-loop"]
        ratios = [row["speedup_over_fastest_peer"] for row in batched if "speedup_over_fastest_peer" in row]
        cases = ", ".join(dict.fromkeys(row["case"].replace("_", " ") for row in batched
                                        if "speedup_over_fastest_peer" in row))
        if ratios:
            rows.append([f"hypergradient time of the fastest of TorchOpt, higher and Betty computing the same "
                         f"hypergradient ÷ distmaml's, 16 random "
                         f"initialisations ({cases})", f"{min(ratios):.1f}× to {max(ratios):.1f}×"])
            for field, what in (
                    ("speedup_over_fastest_loop", "the fastest per-initialisation loop of any kind (a library's, or "
                     "plain autograd) ÷ distmaml's"),
                    ("auto_speedup_over_fastest_loop", "the fastest per-initialisation loop of any kind ÷ distmaml's "
                     "with engine.batched=auto (the faster of its batched path and its own per-task loop)"),
                    ("speed_vs_hand_batched", "a hand-batched implementation (stacked weights, plain autograd) ÷ "
                     "distmaml's")):
                found = [row[field] for row in result["rows"] if row["library"] == "distmaml" and field in row]
                if found:
                    rows.append([f"hypergradient time of {what}, 16 random initialisations ({cases})",
                                 f"{min(found):.1f}× to {max(found):.1f}×"])
            files.append(path.name)
    return rows, files
