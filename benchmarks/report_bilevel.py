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
         "activation", "weight_decay", "logistic", "digits_hyperclean", "digits_hyperclean_mean",
         "digits_hyperclean_val10", "mnist1d_hyperclean", "mnist1d_hyperclean_mean", "digits_distill",
         "digits_distill_m10", "mnist1d_distill")
# Each result's baselines, tuned by the one rule of benchmarks.baselines: benchmarks/results/baselines_<case>.json
BASELINES = {**dict.fromkeys(HYPER[:4], "mnist1d_lr"), "activation": "mnist1d_activation",
             "weight_decay": "mnist1d_weight_decay", "logistic": "logistic",
             "digits_hyperclean": "digits_hyperclean", "digits_hyperclean_mean": "digits_hyperclean",
             "digits_hyperclean_val10": "digits_hyperclean_val10", "mnist1d_hyperclean": "mnist1d_hyperclean",
             "mnist1d_hyperclean_mean": "mnist1d_hyperclean", "digits_distill": "digits_distill",
             "digits_distill_m10": "digits_distill_m10", "mnist1d_distill": "mnist1d_distill"}
# What a learned result's own evaluation reports beside it that is not a baseline and stays in its table:
# the rate grid over the learned rate's own space (its T steps, no decay) and an ablation of the learned data.
OWN_ROWS = {"SGD rate grid (best by validation": "one rate: the grid over the learned rate's own space, T steps "
            "without decay (best by validation", "fixed_init": "the distilled data from one fixed initialisation "
            "(ablation)"}
_CHOSEN = re.compile(r"^(?P<label>.*?)(?P<value>[-+]?\d[\d.]*(?:e[-+]?\d+)?)\)$")


def _own_label(key: str) -> str | None:
    """A learned result's own row's label in the table, or None where the row is left out."""
    for start, label in OWN_ROWS.items():
        if key.startswith(start):
            return label + key[len(start):] if key != start else label
    return None


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
    """Learned hyperparameters or data over training seeds (benchmarks.hyper_seeds) against their
    baselines, each at its own tuned settings (benchmarks.baselines)."""
    result = read(common.RESULTS / f"hyper_{name}.json")
    runs = result["rows"]
    variants: dict[str, list[str]] = {"learned (this config), at the end of its budget": ["learned run"] * len(runs)}
    for index, run in enumerate(runs):
        for key in run["baselines"]:
            own = _own_label(key)
            if own is None:
                continue
            match = _CHOSEN.match(own)
            label = f"{match.group('label')}v)" if match else own
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
        rows.append([label, *cells, _spread(accuracies), f"{statistics.fmean(losses):.4f}" if losses else "–"])
    tuned = _tuned(BASELINES[name], [run["seed"] for run in runs]) if name in BASELINES else None
    if tuned:
        rows += tuned[0]
    header = ["variant", *[f"test accuracy %, seed {run['seed']}" for run in runs], "mean ± std",
              "validation loss (mean)"]
    lines = [_table(header, rows)]
    for run in runs:
        learned = {key: value for key, value in run.get("learned", {}).items() if key not in run}  # said below
        parts = [f"learned {_summary(learned)}"] if learned else []
        if "flip_detection" in run:
            parts.append(f"flipped labels found: {_summary(run['flip_detection'])}")
        parts.append(f"training {run['train_seconds']:.0f} s")
        lines.append(f"- seed {run['seed']}: " + "; ".join(parts))
    config = _config(result)
    grids = any(_CHOSEN.match(key) for keys in variants.values() for key in keys)
    chosen = "; v: the value a grid chose for that seed" if grids else ""
    text = ("\n".join(lines) + f"\n\nConfig: {config}{chosen}. "
            + _source(result, "see the benchmark's docstring").lstrip("\n"))
    if not tuned:
        return text
    first = next(other for other in HYPER if BASELINES.get(other) == BASELINES[name])
    if first != name:  # the same baselines' settings and costs are listed under the first table that shows them
        return text + (f"\nThe tuned baselines are those of the {first.replace('_', ' ')} table above "
                       f"(`python -m benchmarks.baselines {BASELINES[name]}`), where their settings and costs are.\n")
    return text + tuned[1]


def _spread(accuracies: list[float]) -> str:
    if not accuracies:
        return "–"
    std = statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0
    return f"{100 * statistics.fmean(accuracies):.1f} ± {100 * std:.1f}"


def _tuned(case: str, seeds: list[int]) -> tuple[list[list[str]], str] | None:
    """The tuned baselines' table rows for `seeds` (the learned result's), and the lines saying what
    each chose and what its search cost; None where the case has not been measured."""
    path = common.RESULTS / f"baselines_{case}.json"
    if not path.exists():
        return None
    result = read(path)
    by_seed = {row["seed"]: row["baselines"] for row in result["rows"]}
    names = list(result["rows"][0]["baselines"])
    rows, lines = [], []
    for name in names:
        found = [by_seed.get(seed, {}).get(name) for seed in seeds]
        accuracies = [f["test_accuracy"] for f in found if f]
        rows.append([f"{name} (tuned)", *[f"{100 * f['test_accuracy']:.1f}" if f else "–" for f in found],
                     _spread(accuracies), "–"])
        chosen = "; ".join(f"seed {seed}: rate {f['rate']:.3g}, decay {f['decay']:g}, {f['steps']:,} steps"
                           + "".join(f" [{bound}]" for bound in f["edges"] + f["natural_bounds"] if bound != "decay 0")
                           for seed, f in zip(seeds, found) if f)
        any_found = next(f for f in found if f)
        search = any_found["search"]
        cost = statistics.fmean(f["search"]["inner_steps"] for f in found if f)
        seconds = statistics.fmean(f["search"]["cpu_seconds"] for f in found if f)
        folds = f" x {search['folds']} folds (+ the final training)" if search["folds"] else ""
        inits = f"{search['inits']} initialisation" + ("s" if search["inits"] > 1 else "")
        lines.append(f"- {name} ({any_found['training_examples']:,} training examples; chosen by "
                     f"{any_found['selected_by']}): {chosen}. Search: {search['settings']} settings x {inits}{folds}, "
                     f"{cost:,.0f} inner steps and {seconds:.0f} CPU-s per seed")
    widest = max(result["rows"][0]["baselines"].values(), key=lambda f: (len(f["space"]["decays"]),
                                                                           len(f["space"]["rates"])))
    space = widest["space"]  # a baseline may search fewer values (no decay): its own line says what it chose
    header = (f"\nTuned baselines (benchmarks/baselines.py's rule): rates {_summary(space['rates'])}, decays "
              f"{_summary(space['decays'])}, up to {space['budget']:,} steps (early stopping, checked every "
              f"{space['checks'][0]:,}); test accuracy at the chosen setting and step, mean over {result['inits']} "
              f"initialisation{'s' if result['inits'] > 1 else ''} per seed:\n\n")
    return rows, header + "\n".join(lines) + "\n" + _source(result, "see the benchmark's docstring")


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


HYPERCLEAN_HEADLINE = ("noisy", "oracle", "oracle + validation")


def headline_rows() -> tuple[list[list[str]], list[str]]:
    """The README headline's rows for learned data and hyperparameters, and the result files they come from
    (only those that exist)."""
    rows, files = [], []

    def tuned(case: str, name: str) -> str:
        result = read(common.RESULTS / f"baselines_{case}.json")
        return f"{100 * result['summary'][name]['mean']:.1f} %"

    for name, case, label, others in (
            ("hyper_digits_hyperclean", "digits_hyperclean", "hyper-cleaning on scikit-learn's digits, half the "
             "training labels flipped: test accuracy with learned example weights / training on every label / on "
             "only the correct ones / on the correct ones and the clean validation split", HYPERCLEAN_HEADLINE),
            ("hyper_digits_hyperclean_val10", "digits_hyperclean_val10", "the same with a clean validation split of "
             "10 examples per class", HYPERCLEAN_HEADLINE),
            ("hyper_mnist1d_hyperclean", "mnist1d_hyperclean", "the same on MNIST-1D (300 SGD steps of an MLP, 3,600 "
             "training sequences)", HYPERCLEAN_HEADLINE),
            ("hyper_digits_distill", "digits_distill", "dataset distillation on scikit-learn's digits, one learned "
             "example per class, 30 steps from random initialisations: test accuracy / one random real example per "
             "class / the whole training set", ("random real examples", "full training set")),
            ("hyper_learning_rate_schedule", "mnist1d_lr", "a learned learning-rate schedule (5 blocks of 200 SGD "
             "steps) on MNIST-1D: test accuracy / one fixed rate / a cosine schedule", ("fixed rate", "cosine"))):
        path, baselines_path = common.RESULTS / f"{name}.json", common.RESULTS / f"baselines_{case}.json"
        if not (path.exists() and baselines_path.exists()):
            continue
        result = read(path)
        learned = [100 * row["learned_run"]["test_accuracy"] for row in result["rows"]]
        spread = statistics.stdev(learned) if len(learned) > 1 else 0.0
        cells = [f"{statistics.mean(learned):.1f} ± {spread:.1f} %"] + [tuned(case, o) for o in others]
        rows.append([f"{label}; the learned method's mean ± std over {len(learned)} training seeds, the baselines' "
                     "means, each baseline at its own tuned rate, decay and steps", " / ".join(cells)])
        files += [path.name, baselines_path.name]
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


def search_cost() -> str:
    """Test accuracy against the training consumed: learned by hypergradient, or searched for
    (benchmarks.search_cost)."""
    result = read(common.RESULTS / "search_cost.json")

    def row(label: str, point: dict[str, Any]) -> list[str]:
        accuracy = point["test_accuracy"]
        return [label, f"{point['inner_steps']:,.0f}", f"{point['cpu_seconds']:,.0f}",
                f"{100 * accuracy['mean']:.1f} ± {100 * accuracy['std']:.1f}"]

    header = ["how", "inner steps", "CPU-s", "test accuracy %, mean ± std over seeds"]
    s = result["schedule"]
    schedule = ([row(f"learned 5-block schedule, after {p['outer_steps']} outer steps", p) for p in s["learned"]]
                + [row(f"grid search, one constant rate, {p['candidates']} rates", p) for p in s["grid"]]
                + [row(f"random search, 5-block schedules, best of {p['candidates']}", p) for p in s["random"]])
    text = ("The learning-rate schedule on MNIST-1D (configs/mnist1d_lr.yaml inner.schedule_blocks=5), seeds "
            + ", ".join(map(str, s["seeds"])) + ":\n\n" + _table(header, schedule))
    for name, h in result["hyperclean"].items():
        rows = ([row(f"learned example weights, after {p['outer_steps']} outer steps", p) for p in h["learned"]]
                + [row(f"{baseline} (tuned, the whole search)", found) for baseline, found in h["baselines"].items()])
        text += (f"\nHyper-cleaning on digits, {h['protocol']} (hyper_{name}.json, baselines_{name}.json), seeds "
                 + ", ".join(map(str, h["seeds"])) + ":\n\n" + _table(header, rows))
    return (text
            + "\nInner steps: all outer steps x tasks x T (plus one run of T steps that uses phi) for a learned "
              "method, all candidates x steps for a search. CPU-s: one thread; the learned run's training time "
              "pro-rated to its outer steps, a search's candidates trained together on stacked weights."
            + _source(result, "see the benchmark's docstring"))
