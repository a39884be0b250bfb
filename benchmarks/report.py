"""Write the result tables of docs/results.md and README.md from the JSON the benchmarks and studies
wrote: no number is typed by hand.

    python -m benchmarks.report              # rewrite every generated table in both files
    python -m benchmarks.report --check      # exit 1 if either differs from what the results say

A table sits between `<!-- table: NAME -->` and `<!-- /table -->`; NAME picks the renderer below
and, through it, the result file (benchmarks/results/*.json). docs/results.md holds every table;
README.md holds the headline table, a summary of the same result files. Each table ends with the
command that produced its numbers and the machine they were measured on (and the commit, where the
result file records one). A table whose result file does not exist yet is left as it is.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from pathlib import Path
from typing import Any, Callable

from benchmarks import common, influence_balancing, online, peers_es, peers_online, pes, pes_variance
from benchmarks.common import REPO, read
from benchmarks.report_bilevel import (HYPER, headline_rows, hyper, hyper_methods, mnist1d_baselines, peers_hyper,
                                       search_cost, unrolls)
from benchmarks.tables import finite as _finite, group_rows as _rows, machine as _machine, markdown_table as _table, number as _ms, source as _source

README = REPO / "README.md"
RESULTS_DOC = REPO / "docs" / "results.md"
_SECTION = re.compile(r"(<!-- table: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- /table -->)", re.S)


def speed_sine(device: str) -> str:
    result = read(common.RESULTS / f"speed_{device}.json")
    engines = [e for e in ("loop", "batched", "graph", "graph-bf16") if any(r["engine"] == e for r in
                                                                              _rows(result, "sine"))]
    table = {}
    for row in _rows(result, "sine"):
        table.setdefault((row["mode"], row["inner_steps"], row["meta_batch"]), {})[row["engine"]] = row
    rows = []
    for (mode, k, batch), cells in table.items():
        best = "graph" if "graph" in cells else "batched"
        speedup = (f"{cells['loop']['ms_per_iteration'] / cells[best]['ms_per_iteration']:.1f}×"
                   if "loop" in cells else "")
        rows.append([mode.replace("_", " "), str(k), str(batch),
                     *[_ms(cells.get(e, {}).get("ms_per_iteration")) for e in engines], speedup])
    return _table(["mode", "K", "meta-batch", *[f"{e} (ms)" for e in engines], "loop / fastest"], rows) + _source(result)


def speed_rules(device: str) -> str:
    result = read(common.RESULTS / f"speed_{device}.json")
    rows = [r for r in _rows(result, "rules") if r["engine"] == "batched"]
    sgd = next(r for r in rows if r["rule"] == "sgd")["ms_per_iteration"]
    modes = [r for r in _rows(result, "modes") if r["engine"] == "batched"]
    table = [[f"rule {r['rule']}", _ms(r["ms_per_iteration"]), f"{r['ms_per_iteration'] / sgd:.2f}×"] for r in rows]
    table += [[f"mode {r['mode']}", _ms(r["ms_per_iteration"]), f"{r['ms_per_iteration'] / sgd:.2f}×"] for r in modes]
    return _table(["inner rule or mode (sine, meta-batch 25, K = 5)", "ms / iteration", "vs sgd, second order"],
                  table) + _source(result)


def speed_images(device: str) -> str:
    result = read(common.RESULTS / f"speed_{device}.json")
    rows = []
    for group in ("omniglot", "miniimagenet"):
        for row in _rows(result, group):
            name = row["task"] + (", ANIL (head only)" if row["adapt"] else "")
            rows.append([name, f"{row['meta_batch']}", str(row["inner_steps"]), row["engine"],
                         _ms(row["ms_per_iteration"]), f"{row['tasks_per_s']:.1f}"])
    return _table(["task (generated images)", "meta-batch", "K", "engine", "ms / iteration", "tasks / s"],
                  rows) + _source(result)


def episodes(device: str) -> str:
    result = read(common.RESULTS / f"speed_{device}.json")
    rows = [[row["source"], f"{row['images_per_s']:,.0f}"] for row in _rows(result, "episodes")]
    return _table(["mini-ImageNet-shaped episodes (84x84 RGB, 5-way 1-shot, 15 query, meta-batch 4)",
                   "images / s"], rows) + _source(result)


def memory_sine(device: str) -> str:
    result = read(common.RESULTS / f"memory_{device}.json")
    settings = list(dict.fromkeys(row["setting"] for row in _rows(result, "sine")))
    table: dict[int, dict[str, float]] = {}
    for row in _rows(result, "sine"):
        table.setdefault(row["inner_steps"], {})[row["setting"]] = row["measured_mib"]
    rows = [[str(k), *[f"{cells[s]:.0f}" if s in cells else "–" for s in settings]] for k, cells in table.items()]
    return _table(["K", *[f"{s} (MiB)" for s in settings]], rows) + _source(result)


def memory_estimate(device: str) -> str:
    result = read(common.RESULTS / f"memory_{device}.json")
    rows = [[row["model"], row["setting"], str(row["inner_steps"]), f"{row['measured_mib']:.0f}",
             f"{row['estimate_mib']:.0f}", f"{row['estimate_over_measured']:.2f}", f"{row['seconds_per_iteration']:.2f}"]
            for row in result["rows"]]
    return _table(["model", "setting", "K", "measured peak (MiB)", "estimate (MiB)", "estimate / measured",
                   "s / iteration"], rows) + _source(result)


def distributed() -> str:
    result = read(common.RESULTS / "distributed_cpu.json")
    rows = [[str(r["world"]), str(r["tasks_per_rank"]), _ms(r["compute_ms"]), _ms(r["wait_ms"]),
             f"{r['all_reduce_ms']:.3f}", _ms(r["step_ms"]), f"{100 * r['all_reduce_share']:.1f} %"]
            for r in result["rows"]]
    sizes = [[r["model"], f"{r['parameters']:,}", f"{r['bytes']:,}"] for r in result["all_reduce_bytes"]]
    return (_table(["processes", "tasks / rank", "compute (ms)", "wait (ms)", "all-reduce (ms)", "step (ms)",
                    "all-reduce share"], rows) + "\n" +
            _table(["model (meta-parameters, float32, + stop flags and loss)", "parameters", "bytes per all-reduce"], sizes) +
            _source(result).replace("medians", f"meta-batch {result['meta_batch']}, K = {result['inner_steps']}; "
                                    "medians"))


def peers() -> str:
    result = read(common.RESULTS / "peers_cpu.json")
    written_here = result.get("written_here", {})
    libraries = ["distmaml", "distmaml-loop", *result["libraries"], *written_here]
    table: dict[tuple, dict[str, dict]] = {}
    for row in result["rows"]:
        table.setdefault((row["kind"], row["rule"], row["order"], row["inner_steps"], row["meta_batch"]),
                         {})[row["library"]] = row
    rows = []
    for (kind, rule, order, k, batch), cells in table.items():
        line = [("sine MLP" if kind == "sine" else "Conv-4, Omniglot-shaped") + (f", {rule} inner steps"
                                                                                 if rule != "sgd" else ""),
                f"{order} order", str(k), str(batch)]
        for name in libraries:
            cell = cells.get(name)
            if cell is None:
                line.append("")
            elif cell["status"] == "absent":
                line.append("absent")
            elif cell["status"] != "equal":
                line.append(f"differs ({cell['relative_error']:.0e})")
            elif name == "distmaml":
                line.append(_ms(cell["ms_per_iteration"]))
            else:
                line.append(f"{_ms(cell['ms_per_iteration'])} ({cell['distmaml_speedup']:.1f}×)")
        rows.append(line)
    loaded = "; ".join(f"{name}: {how}" for name, how in result["libraries"].items())
    ours = "".join(f" {name}: {how}." for name, how in written_here.items())
    return (_table(["model", "meta-gradient", "K", "meta-batch", *[f"{n} ms (× distmaml)" for n in libraries]], rows)
            + f"\nLibraries: {loaded}.{ours} Every peer's meta-gradient equals distmaml's (float64, relative error "
            f"≤ {result['tolerance']:g}) before it is timed." + _source(result))


def _seeds_report(name: str) -> dict[str, Any]:
    """A seeds study (distmaml study seeds), copied to benchmarks/results/seeds_<name>.json, with the
    nulls of its strict JSON read back as NaN."""
    report = read(common.RESULTS / f"seeds_{name}.json")
    for rows in report["over_runs"].values():
        for row in rows:
            for key in ("mean", "std", "median_of_medians"):
                row[key] = _finite(row.get(key))
    for run in report["runs"]:
        for evaluation in run["eval"].values():
            for row in evaluation["steps"]:
                for key, value in row.items():
                    if value is None:
                        row[key] = math.nan
        run["sharpness"] = [(iteration, _finite(value)) for iteration, value in run["sharpness"]]
    return report


def seeds(name: str) -> str:
    """A seeds study (distmaml study seeds), copied to benchmarks/results/seeds_<name>.json."""
    from distmaml.commands.study.seeds import format_report

    report = _seeds_report(name)
    return format_report(report) + f"\n\n`{report.get('command', 'distmaml study seeds')}`\n"


def sharpness(names: list[str]) -> str:
    """When each run of these seeds studies first logged a sharpness (top Hessian eigenvalue of the
    support loss at theta) above 2 / inner.lr, where plain inner steps stop being stable, and where it
    ended, in units of 1 / inner.lr."""
    rows = []
    for name in names:
        report = _seeds_report(name)
        for run in report["runs"]:
            limit = 2 / run["inner_lr"]
            logged = [(i, v) for i, v in run["sharpness"] if math.isfinite(v)]
            first = next((i for i, v in logged if v > limit), None)
            rows.append([report["config"] + (" " + " ".join(report["overrides"]) if report["overrides"] else ""),
                         f"{run['inner_lr']:g}", str(run["seed"]), str(run["threads"]), f"{run['iterations']:,}",
                         f"{first:,}" if first is not None else "never",
                         f"{logged[-1][1] * run['inner_lr']:.2f}" if logged else "–",
                         f"{max(v for _, v in logged) * run['inner_lr']:.2f}" if logged else "–"])
    return (_table(["config", "inner.lr (α)", "seed", "threads", "iterations", "first logged above 2 / α",
                    "sharpness × α at the end", "largest sharpness × α"], rows)
            + "\nSharpness is logged every `train.log_every` iterations (mean over the meta-batch); plain inner "
              "steps at α are stable while sharpness × α < 2. From the same result files as the tables above.\n")


def seeds_side_by_side(entries: list[tuple[str, str]], step: int) -> str:
    """Several seeds studies (benchmarks/results/seeds_<name>.json) in one table: each variant's mean ± std
    over training seeds after `step` inner steps at every number of shots, and its diverged tasks."""
    reports = [(label, _seeds_report(name)) for label, name in entries]
    shots = reports[0][1]["shots"]
    metric = reports[0][1].get("metric", "loss")
    scale, digits, what = (100, 1, "accuracy %") if metric == "accuracy" else (1, 3, "query MSE")
    rows, commands = [], []
    for label, report in reports:
        cells = [label, str(len(report["runs"]))]
        for count in map(str, shots):
            row = report["over_runs"][count][step]
            cells.append(f"{row['mean'] * scale:.{digits}f} ± {row['std'] * scale:.{digits}f}"
                         if math.isfinite(row["mean"]) else f"diverged ({row['diverged_tasks']} tasks)")
        rows.append(cells)
        commands.append(f"`{report['command']}`")
    header = ["variant", "seeds", *[f"{count}-shot {what}, {step} step(s)" for count in shots]]
    return (_table(header, rows) + f"\nMean ± std over training seeds, each seed evaluated on the same "
            f"{reports[0][1]['tasks']} fresh tasks. Commands: " + "; ".join(commands) + ".\n")


def previous(part: str) -> str:
    """Figures measured at an older commit (benchmarks/results/previous_version.json), with their commands."""
    result = read(common.RESULTS / "previous_version.json")
    section = result[part]
    if part == "gpu":
        rows = [[r["task"], str(r["meta_batch"]), str(r["K"]), _ms(r["loop"]), _ms(r["eager"]), f"**{_ms(r['graph'])}**",
                 _ms(r["graph_bf16"]), f"{r['loop'] / r['graph']:.0f}×" if r["loop"] else ""] for r in section["rows"]]
        table = _table(["task", "meta-batch", "K", "per-task loop", "batched, eager", "batched, CUDA graph",
                        "graph, bf16", "graph vs loop"], rows) + f"\n{section['omniglot_5w1s']}.\n"
    elif part == "imaml":
        rows = [[r["run"], f"{r['iterations']:,}", *[f"{r['steps'][s]:.3f}" for s in ("0", "1", "2", "5")],
                 f"{r['steps']['10']:.3f} ± {r['ci95_10']:.3f}"] for r in section["rows"]]
        table = _table(["run", "iterations", "0 steps", "1 step", "2 steps", "5 steps", "10 steps"], rows)
    else:
        rows = [[r[0], str(r[1]), r[2], f"{r[3]:.3f}", f"{r[4]:.4f}", str(r[5])] for r in section["rows"]]
        table = _table(["mode", "K", "query MSE after K steps (95% CI)", "support MSE after K steps",
                        "s / iteration", "peak memory (MB)"], rows)
    machine = section["machine"]
    where = machine.get("gpu") or machine.get("cpu")
    # The command names the commit it ran at, e.g. "python benchmarks/gpu_speed.py --quick (commit 418da60)".
    command = re.sub(r"\s*\(commit (\w+)\)$", "", section["command"])
    commit = re.search(r"\(commit (\w+)\)$", section["command"])
    at = f"commit {commit.group(1)}, " if commit else ""
    return table + f"\n`{command}` — {at}{where}, torch {machine['torch']}: that commit's code and benchmark.\n"


def versions() -> str:
    """The same meta-iterations in this tree and in an earlier commit's (benchmarks.versions)."""
    result = read(common.RESULTS / "versions_cpu.json")
    here, other = f"{result['this_tree']} and the changes on it", result["against"]
    rows = [[r["case"], _ms(r["ms_this_tree"]), _ms(r["ms_other"]), f"{r['ratio']:.2f}"] for r in result["rows"]]
    windows = len(next(iter(result["rows"][0]["windows"].values()))) if result["rows"] else 0
    return (_table(["meta-iteration (CPU, one thread per worker)", f"this tree ({here}) ms", f"commit {other} ms",
                    "ratio"], rows)
            + _source(result, f"medians of {windows} interleaved windows per tree, see the benchmark's docstring"))


def headline() -> str:
    """README's one table: the sine protocol over training seeds, and the peers' time against distmaml's."""
    rows, diverged = [], 0
    for label, name in (("sine MAML, `configs/sine_maml.yaml` (α = 0.001)", "sine_maml"),
                        ("the same at the paper's α = 0.01, `configs/sine_maml_paper.yaml`", "sine_maml_paper")):
        report = _seeds_report(name)
        last, parts = report["steps"], []
        for count in map(str, report["shots"]):
            steps = report["over_runs"][count]
            diverged += sum(row["diverged_tasks"] for row in steps)
            cells = [f"{steps[s]['mean']:.3f} ± {steps[s]['std']:.3f}" if math.isfinite(steps[s]["mean"])
                     else f"diverged (median {steps[s]['median_of_medians']:.3f})" for s in (1, last)]
            parts.append(f"{count}-shot " + " / ".join(cells))
        rows.append([f"{label}: query MSE after 1 / {last} inner steps, mean ± std over {len(report['runs'])} "
                     f"training seeds, {report['tasks']} fresh tasks", "; ".join(parts)])
    rows.append(["tasks whose adaptation diverged, in all of these runs, at any step", str(diverged)])
    peers_result = read(common.RESULTS / "peers_cpu.json")
    for kind, label in (("sine", "sine MLP"), ("conv4", "Conv-4 on Omniglot-shaped images")):
        found = [r for r in peers_result["rows"] if r["kind"] == kind and r["rule"] == "sgd"]
        ratios = [r["distmaml_speedup"] for r in found if r["library"] in peers_result["libraries"]
                  and r["status"] == "equal"]
        if ratios:
            batches = "/".join(map(str, sorted({r["meta_batch"] for r in found})))
            setting = f"{label}, meta-batch {batches}, K = {', '.join(map(str, sorted({r['inner_steps'] for r in found})))}"
            rows.append([f"meta-gradient time of {', '.join(peers_result['libraries'])} ÷ distmaml's: {setting}, "
                         f"first and second order", _range(ratios)])
            rows += _limit_rows(found, f"{setting}, first and second order")
    bilevel_rows, bilevel_files = headline_rows()
    rows += bilevel_rows
    return (_table(["result", "distmaml"], rows) + "\nGenerated from benchmarks/results/"
            + _by_machine(["seeds_sine_maml.json", "seeds_sine_maml_paper.json", "peers_cpu.json", *bilevel_files])
            + "; [docs/results.md](docs/results.md) has every table with its command and machine.\n")


def _range(ratios: list[float]) -> str:
    return f"{min(ratios):.1f}× to {max(ratios):.1f}×"


def _limit_rows(rows: list[dict[str, Any]], setting: str, what: str = "meta-gradient") -> list[list[str]]:
    """The honest denominators beside the libraries': the fastest per-task loop of any kind (the plain
    autograd loop written for the benchmark included), and the hand-batched implementation."""
    mine = [r for r in rows if r["library"] == "distmaml"]
    out = []
    loops = [r["speedup_over_fastest_loop"] for r in mine if "speedup_over_fastest_loop" in r]
    if loops:
        out.append([f"{what} time of the fastest per-task loop of any kind (a library's, or plain autograd) ÷ "
                    f"distmaml's: {setting}", _range(loops)])
    auto = [r["auto_speedup_over_fastest_loop"] for r in mine if "auto_speedup_over_fastest_loop" in r]
    if auto and auto != loops:
        out.append([f"{what} time of the fastest per-task loop of any kind ÷ distmaml's with engine.batched=auto (the "
                    f"faster of its batched path and its own per-task loop): {setting}", _range(auto)])
    hand = [r["speed_vs_hand_batched"] for r in mine if "speed_vs_hand_batched" in r]
    if hand:
        out.append([f"{what} time of a hand-batched implementation (stacked weights, plain autograd) ÷ distmaml's: "
                    f"{setting}", _range(hand)])
    return out


def _by_machine(files: list[str]) -> str:
    """Result files grouped by the machine each was measured on: "a.json, b.json (machine 1), c.json (machine 2)";
    a seeds study records none (its numbers are training quality, not time) and is named alone."""
    groups: dict[str, list[str]] = {}
    for name in files:
        result = read(common.RESULTS / name)
        groups.setdefault(_machine(result) if "machine" in result else "", []).append(name)
    return ", ".join(", ".join(names) + (f" ({where})" if where else "") for where, names in groups.items())


def _online(name: str, render: Callable[[dict[str, Any]], str]) -> str:
    """An online study's table (benchmarks.online, benchmarks.peers_online), with its command and machine."""
    result = read(common.RESULTS / f"{name}.json")
    return render(result) + _source(result, "see the benchmark's docstring")


RENDERERS: dict[str, Callable[[], str]] = {
    "speed-sine-cpu": lambda: speed_sine("cpu"), "speed-rules-cpu": lambda: speed_rules("cpu"),
    "speed-images-cpu": lambda: speed_images("cpu"), "episodes-cpu": lambda: episodes("cpu"),
    "memory-sine-cpu": lambda: memory_sine("cpu"), "memory-estimate-cpu": lambda: memory_estimate("cpu"),
    "speed-sine-cuda": lambda: speed_sine("cuda"), "speed-images-cuda": lambda: speed_images("cuda"),
    "speed-rules-cuda": lambda: speed_rules("cuda"), "memory-estimate-cuda": lambda: memory_estimate("cuda"),
    "distributed-cpu": distributed, "peers-cpu": peers,
    "seeds-paper": lambda: seeds("sine_maml_paper"), "seeds-default": lambda: seeds("sine_maml"),
    "seeds-check": lambda: seeds("seed_check"),
    "seeds-threads2": lambda: seeds("sine_maml_threads2"),
    "seeds-metasgd": lambda: seeds("sine_metasgd"),
    "sharpness-sine": lambda: sharpness(["sine_maml_paper", "sine_maml", "sine_maml_threads2", "seed_check"]),
    "rules-sine": lambda: seeds_side_by_side([("MAML (sgd), sine_maml_paper.yaml", "sine_maml_paper"),
                                              ("Meta-SGD, sine_metasgd.yaml", "sine_metasgd")], step=1),
    "rules-omniglot": lambda: seeds_side_by_side([("MAML", "omniglot_maml"), ("Meta-SGD", "omniglot_metasgd"),
                                                  ("LSLR (MAML++)", "omniglot_lslr"), ("ANIL", "omniglot_anil")],
                                                 step=3),
    "gpu-previous": lambda: previous("gpu"), "imaml-previous": lambda: previous("imaml"),
    "inner-steps-previous": lambda: previous("inner_steps"),
    "versions-cpu": versions, "mnist1d-baselines": mnist1d_baselines, "peers-hyper-cpu": peers_hyper,
    "unrolls-cpu": unrolls,
    **{f"hyper-{name}": (lambda name=name: hyper(name)) for name in HYPER},
    "hyper-methods-weight_decay": lambda: hyper_methods("weight_decay"),
    "search-cost": search_cost,
    "online-reweight": lambda: _online("online_reweight", online.reweight_table),
    "online-lr": lambda: _online("online_lr", online.lr_table),
    "peers-online-cpu": lambda: _online("peers_online_cpu", peers_online.table),
    "pes-lr": lambda: _online("pes_lr", pes.table),
    "pes-schedule": lambda: _online("pes_lr", pes.schedule_table),
    "pes-objective": lambda: _online("pes_lr", pes.objective_table),
    "pes-variance": lambda: _online("pes_variance", pes_variance.table),
    "influence-balancing": lambda: _online("influence_balancing", influence_balancing.table),
    "peers-es-cpu": lambda: _online("peers_es_cpu", peers_es.table),
    "headline": headline,
}


def render(text: str) -> tuple[str, list[str]]:
    """`text` with every table section rewritten; and the sections whose results are missing."""
    missing = []

    def replace(match: re.Match) -> str:
        name = match.group("name")
        try:
            body = RENDERERS[name]()
        except FileNotFoundError:
            missing.append(name)
            return match.group(0)
        return match.group(1) + body + match.group(4)

    return _SECTION.sub(replace, text), missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if a file is not what the results say")
    parser.add_argument("--readme", type=Path, help=f"the README to render (default {README.relative_to(REPO)}); "
                        "naming only this file renders only this file")
    parser.add_argument("--results", type=Path, help=f"the results page to render (default "
                        f"{RESULTS_DOC.relative_to(REPO)}); naming only this file renders only this file")
    args = parser.parse_args(argv)
    files = [path for path in (args.readme, args.results) if path is not None] or [README, RESULTS_DOC]
    differs = []
    for path in files:
        before = path.read_text()
        after, missing = render(before)
        for name in missing:
            print(f"{path.name}: no results yet for table {name}; left as it is", file=sys.stderr)
        if args.check:
            if after != before:
                print(f"{path} differs from the results: run python -m benchmarks.report", file=sys.stderr)
                differs.append(path)
            continue
        if after != before:
            path.write_text(after)
        print(f"wrote {len(_SECTION.findall(after))} table(s) in {path}")
    return 1 if differs else 0


if __name__ == "__main__":
    raise SystemExit(main())
