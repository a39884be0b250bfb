"""Online bi-level optimisation over training seeds: reweighting noisy labels while one network trains,
and a learning rate learned along the runs' own trajectories.

    python -m benchmarks.online reweight --seeds 0 1 2     # -> results/online_reweight.json
    python -m benchmarks.online lr --seeds 0 1 2           # -> results/online_lr.json

reweight: on MNIST-1D and digits with half of the training labels flipped (and digits with 10 clean
validation examples per class), ONE network trains online (online.runs = 1, unroll 1, no horizon) for
the tuned noisy baseline's length at that seed (its early-stopped steps, benchmarks.baselines), at the
offline hyper-cleaning config's inner rate, with its example weights from each of:

    hyperclean             one learned weight per training example (the offline problem, online)
    weighting_net          Meta-Weight-Net: a net from an example's loss to its weight (Shu et al. 2019)
    learning_to_reweight   each batch's weights from a one-step lookahead (Ren et al. 2018), no phi

Reported: the trained network's own test accuracy at the end of its budget; and early-stopped: a second
run with half of the validation split held out (task.args.holdout: no loss reads it), its checkpoints
every STOP_EVERY outer steps scored on that holdout, the best one's test accuracy. The baselines are the
tuned ones (benchmarks/results/baselines_<case>.json); the offline row is the learned hyper-cleaning
result (benchmarks/results/hyper_<case>.json) with the inner steps it consumed. Inner steps online
count the lookahead and the real step alike.

lr: one learning rate of plain SGD on MNIST-1D (configs/mnist1d_lr_online.yaml, horizon 1,000), learned
online by ONE run (online.runs = 1) with unroll U = 1 (greedy), 10 and 100, from 0.1 and from 3.0 (the
grid's best fixed rate for 1,000 steps is about 1), each for the same 4,000 real inner steps (four
training runs of 1,000 steps one after the other); the rate every LR_EVERY real steps (the trajectory),
and the evaluation's fresh training runs of 1,000 steps at the final rate and at each rate of the grid.
With --hd: hypergradient descent (Baydin et al. 2018), U = 1 with the training loss on the run's next
mini-batch as the outer loss (training_run.outer=next_batch), from the same starts; added to the
result file's rows.
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
from benchmarks.tables import markdown_table
from distmaml.build import build
from distmaml.commands.train import train
from distmaml.config import load_config
from distmaml.run.checkpoint import checkpoint_iteration, list_checkpoints, load_checkpoint

CASES = {
    "mnist1d": {"config": "configs/mnist1d_mwn_online.yaml", "overrides": [], "holdout": 200,
                "baselines": "baselines_mnist1d_hyperclean", "offline": "hyper_mnist1d_hyperclean",
                "offline_config": "configs/mnist1d_hyperclean.yaml"},
    "digits": {"config": "configs/mnist1d_mwn_online.yaml",
               "overrides": ["task.family=digits", "task.args.train=0.6", "task.args.validation=0.2",
                             "model.hidden=[64]", "training_run.batch_size=0"], "holdout": 180,
               "baselines": "baselines_digits_hyperclean", "offline": "hyper_digits_hyperclean",
               "offline_config": "configs/digits_hyperclean.yaml"},
    "digits_val10": {"config": "configs/mnist1d_mwn_online.yaml",
                     "overrides": ["task.family=digits", "task.args.train=0.6",
                                   "task.args.validation=0.0556",
                                   "model.hidden=[64]", "training_run.batch_size=0"], "holdout": 50,
                     "baselines": "baselines_digits_hyperclean_val10", "offline": "hyper_digits_hyperclean_val10",
                     "offline_config": "configs/digits_hyperclean.yaml"},
}
# Each method's problem and outer rate (Adam): the offline problem's 0.1 for one logit per example,
# Shu et al.'s 1e-3 for the weighting net; Learning to Reweight learns nothing.
METHODS = {"hyperclean": ["problem.name=hyperclean", "train.lr=0.1"],
           "weighting_net": ["problem.name=weighting_net", "train.lr=0.001"],
           "learning_to_reweight": ["problem.name=learning_to_reweight"]}
STOP_EVERY = 20

LR_CONFIG = "configs/mnist1d_lr_online.yaml"
LR_UNROLLS = (1, 10, 100)
# Hypergradient descent (Baydin et al. 2018): U = 1 with the next training mini-batch as the outer loss.
HD = (1, "next_batch")
LR_STARTS = (0.1, 3.0)
LR_STEPS = 4000  # real inner steps per run
LR_EVERY = 200


def _noisy_length(baselines: dict, seed: int) -> int:
    for row in baselines["rows"]:
        if row["seed"] == seed:
            return int(row["baselines"]["noisy"]["steps"])
    raise SystemExit(f"benchmarks.online: {baselines['case']} has no tuned noisy baseline for seed {seed}: run "
                     f"python -m benchmarks.baselines {baselines['case']} --seeds {seed}")


def _run_accuracy(learner, state: dict) -> dict[str, float]:
    """The persistent run's test and holdout accuracy in checkpoint `state` (the network's prediction
    reads no learned phi in these problems: the weights decide it)."""
    weights = {name: value[0] for name, value in state["online"]["weights"].items()}
    data, out = learner.family.dataset, {}
    with torch.no_grad():
        for split, (x, y) in {"test": (data.test_x, data.test_y), "holdout": learner.family.holdout}.items():
            logits = learner.problem.predict(weights, {}, x)
            out[split] = float((logits.argmax(-1) == y).double().mean())
    return out


def reweight_seed(case: str, method: str, seed: int, out_dir: Path) -> dict[str, Any]:
    spec = CASES[case]
    baselines = read(RESULTS / f"{spec['baselines']}.json")
    length = _noisy_length(baselines, seed)
    common = [*spec["overrides"], *METHODS[method], f"train.seed={seed}", f"train.iterations={length}",
              "logging.progress=false", "eval.at_end=false", f"train.log_every={STOP_EVERY}"]
    full_dir = out_dir / f"{case}_{method}_{seed}"
    started = time.perf_counter()
    full = train(load_config(REPO / spec["config"], [*common, f"run.dir={full_dir}", "run.resume=false"]))
    seconds = time.perf_counter() - started
    # Early stopping on a holdout carved from the validation split: the outer loss sees the rest.
    stop_dir = out_dir / f"{case}_{method}_{seed}_holdout"
    holdout_args = [f"task.args.holdout={spec['holdout']}", f"run.dir={stop_dir}", "run.resume=false",
                    f"train.checkpoint_every={STOP_EVERY}", f"train.keep_checkpoints={length // STOP_EVERY + 2}"]
    config = load_config(REPO / spec["config"], [*common, *holdout_args])
    held = train(config)
    learner = build(config)  # its data set and network, to score the checkpoints' runs
    scored = [(checkpoint_iteration(path), _run_accuracy(learner, load_checkpoint(path)))
              for path in list_checkpoints(stop_dir / "checkpoints")]
    best_iteration, best = max(scored, key=lambda item: (item[1]["holdout"], -item[0]))
    return {"seed": seed, "length": length, "status": full["status"], "train_seconds": seconds,
            "test_accuracy": full["online"]["metrics"].get("test_accuracy") if "online" in full else math.nan,
            "inner_steps": 2 * length,
            "holdout": {"test_accuracy_at_end": held["online"]["metrics"].get("test_accuracy"),
                        "stopped_at": best_iteration, "test_accuracy_stopped": best["test"],
                        "holdout_accuracy_stopped": best["holdout"], "examples": spec["holdout"],
                        "curve": [{"iteration": i, **scores} for i, scores in scored]}}


def _offline(case: str) -> dict[str, Any]:
    spec = CASES[case]
    result = read(RESULTS / f"{spec['offline']}.json")
    config = load_config(REPO / spec["offline_config"], result.get("overrides", []))
    steps = config.train.iterations * config.train.meta_batch * config.inner.steps
    return {"test_accuracy_mean": result["learned_test_accuracy_mean"],
            "test_accuracy_std": result["learned_test_accuracy_std"], "inner_steps": steps,
            "command": result.get("command")}


def reweight(seeds: list[int], out_dir: Path, cases: list[str], methods: list[str]) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for case in cases:
        baselines = read(RESULTS / f"{CASES[case]['baselines']}.json")
        rows[case] = {"baselines": baselines["summary"], "offline": _offline(case), "methods": {}}
        for method in methods:
            runs = [reweight_seed(case, method, seed, out_dir) for seed in seeds]
            rows[case]["methods"][method] = {"seeds": runs, **_spread(runs, baselines["summary"])}
            print(f"{case} {method}: {rows[case]['methods'][method]['test_accuracy_mean']:.4f}", flush=True)
    return rows


def _spread(runs: list[dict], baselines: dict) -> dict[str, float]:
    def mean_std(values):
        values = [v for v in values if v is not None and math.isfinite(v)]
        return (statistics.mean(values) if values else math.nan,
                statistics.stdev(values) if len(values) > 1 else 0.0)

    end, end_std = mean_std([run["test_accuracy"] for run in runs])
    stopped, stopped_std = mean_std([run["holdout"]["test_accuracy_stopped"] for run in runs])
    held_end, held_end_std = mean_std([run["holdout"]["test_accuracy_at_end"] for run in runs])
    noisy, oracle = baselines["noisy"]["mean"], baselines["oracle"]["mean"]
    # How far the held-out accuracy falls from its best checkpoint to the last: the peak-then-degrade of a
    # network memorising the flipped labels.
    drop, _ = mean_std([max(point["holdout"] for point in run["holdout"]["curve"])
                        - run["holdout"]["curve"][-1]["holdout"] for run in runs])
    return {"holdout_drop_mean": drop, "test_accuracy_mean": end, "test_accuracy_std": end_std, "stopped_mean": stopped,
            "stopped_std": stopped_std, "holdout_end_mean": held_end, "holdout_end_std": held_end_std,
            "gap_share": (end - noisy) / (oracle - noisy), "stopped_gap_share": (stopped - noisy) / (oracle - noisy),
            "inner_steps_mean": statistics.mean(run["inner_steps"] for run in runs)}


def lr_seed(unroll_steps: int, start: float, seed: int, out_dir: Path, outer: str = "soft_error") -> dict[str, Any]:
    iterations = LR_STEPS // unroll_steps
    every = max(LR_EVERY // unroll_steps, 1)
    run_dir = out_dir / f"lr_u{unroll_steps}_{outer}_{start:g}_{seed}"
    config = load_config(REPO / LR_CONFIG, [f"training_run.outer={outer}",
        "online.runs=1", f"online.unroll={unroll_steps}", f"inner.lr={start}", f"train.seed={seed}", f"train.iterations={iterations}",
        f"run.dir={run_dir}", "run.resume=false", "logging.progress=false", f"train.log_every={every}",
        f"train.checkpoint_every={every}", f"train.keep_checkpoints={iterations // every + 2}"])
    started = time.perf_counter()
    summary = train(config)
    seconds = time.perf_counter() - started
    trajectory = [{"inner_steps": 0, "rate": start}]
    for path in list_checkpoints(run_dir / "checkpoints"):
        log_rate = load_checkpoint(path)["rule"]["inner.lr.log_schedule"]
        trajectory.append({"inner_steps": checkpoint_iteration(path) * unroll_steps,
                           "rate": float(log_rate.exp()[0])})
    evaluation = summary.get("eval", {})
    return {"seed": seed, "unroll": unroll_steps, "outer": outer, "start": start, "status": summary["status"],
            "train_seconds": seconds, "final_rate": trajectory[-1]["rate"], "trajectory": trajectory,
            "test_accuracy": evaluation.get("test_accuracy"), "grid": evaluation.get("grid")}


def _variants() -> list[tuple[int, str]]:
    return [(unroll_steps, "soft_error") for unroll_steps in LR_UNROLLS] + [HD]


def learning_rate(seeds: list[int], out_dir: Path, variants: list[tuple[int, str]]) -> dict[str, Any]:
    rows = []
    for unroll_steps, outer in variants:
        for start in LR_STARTS:
            for seed in seeds:
                row = lr_seed(unroll_steps, start, seed, out_dir, outer)
                rows.append(row)
                print(f"U={unroll_steps} from {start:g} seed {seed}: rate {row['final_rate']:.4g}, test "
                      f"{row['test_accuracy']}", flush=True)
    return {"rows": rows}


LR_FIGURE = REPO / "docs" / "online_lr.png"


def lr_figure(result: dict[str, Any], path: Path = LR_FIGURE) -> Path:
    """The learned rate against the real inner steps taken, per unroll and start (mean over seeds, the
    seeds' range shaded), with the grid's best fixed rate for 1,000 steps."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9.5, 4.6))
    axes = fig.subplots()
    for (unroll_steps, outer, start), color in zip([(u, o, s) for u, o in _variants() for s in LR_STARTS],
                                                   ["C0", "C0", "C1", "C1", "C2", "C2", "C3", "C3"]):
        rows = [r for r in result["rows"] if r["unroll"] == unroll_steps and r["start"] == start
                and r.get("outer", "soft_error") == outer]
        if not rows:
            continue
        steps = [point["inner_steps"] for point in rows[0]["trajectory"]]
        rates = [[run["trajectory"][i]["rate"] for run in rows] for i in range(len(steps))]
        axes.plot(steps, [statistics.mean(r) for r in rates], color=color, linestyle="-" if start < 1 else "--",
                  label=f"U = {unroll_steps}, from {start:g}" + ("" if outer == "soft_error" else
                                                                  ", next training batch (HD)"))
        axes.fill_between(steps, [min(r) for r in rates], [max(r) for r in rates], color=color, alpha=0.15)
    best = [grid["lrs"][_best(grid)]
            for grid in (r["grid"] for r in result["rows"] if r.get("grid"))]
    return finish_rate_figure(fig, axes, best, "real inner steps of the run (a fresh network every 1,000)",
                              "One rate learned online, MNIST-1D: the short-horizon bias", path)


def finish_rate_figure(fig, axes, best: list[float], xlabel: str, title: str, path: Path) -> Path:
    """A learned rate's figure: the grid's best fixed rate (the median of `best`) as a line, a log rate
    axis, the labels and the legend; written to `path`."""
    from distmaml.files import write_figure

    if best:
        axes.axhline(statistics.median(best), color="black", linestyle=":",
                     label=f"the grid's best fixed rate for 1,000 steps ({statistics.median(best):g})")
    axes.set_yscale("log")
    axes.set_xlabel(xlabel)
    axes.set_ylabel("learned learning rate")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    write_figure(path, fig, dpi=120)
    return path


def reweight_table(result: dict[str, Any]) -> str:
    header = ["data", "method", "test accuracy %, end of budget", "early-stopped on the holdout %",
              "holdout accuracy: best checkpoint − last, points", "share of the noisy-to-oracle gap", "inner steps"]
    lines = []
    for case, row in result["rows"].items():
        base = row["baselines"]
        for name, label in (("noisy", "tuned noisy"), ("validation only", "tuned validation only"),
                            ("oracle", "tuned oracle"), ("oracle + validation", "tuned oracle + validation")):
            lines.append([case, label, f"{100 * base[name]['mean']:.1f} ± {100 * base[name]['std']:.1f}", "", "", "",
                          ""])
        offline = row["offline"]
        share = (offline["test_accuracy_mean"] - base["noisy"]["mean"]) / (base["oracle"]["mean"] - base["noisy"]["mean"])
        lines.append([case, "offline hyperclean (episodic)", f"{100 * offline['test_accuracy_mean']:.1f} ± "
                      f"{100 * offline['test_accuracy_std']:.1f}", "", "", f"{100 * share:.0f} %",
                      f"{offline['inner_steps']:,}"])
        for method, found in row["methods"].items():
            lines.append([case, f"online {method}", f"{100 * found['test_accuracy_mean']:.1f} ± "
                          f"{100 * found['test_accuracy_std']:.1f}",
                          f"{100 * found['stopped_mean']:.1f} ± {100 * found['stopped_std']:.1f}",
                          f"{100 * found['holdout_drop_mean']:.1f}",
                          f"{100 * found['gap_share']:.0f} % (stopped {100 * found['stopped_gap_share']:.0f} %)",
                          f"{found['inner_steps_mean']:,.0f}"])
    return markdown_table(header, lines)


def _best(grid: dict[str, Any]) -> int:
    """The grid's rate chosen by the run's outer loss on the validation split (the soft error where that is
    the outer loss, else the loss)."""
    scores = grid.get("validation_outer_loss", grid["validation_loss"])
    return min(range(len(scores)), key=lambda i: scores[i])


def lr_table(result: dict[str, Any]) -> str:
    header = ["unroll U", "outer loss", "start", "final rate (mean ± std)", "test accuracy %, fresh 1,000-step runs at it",
              "the grid's best rate (by the validation split's soft error, or loss), its test accuracy %", "seeds"]
    lines = []
    for unroll_steps, outer in _variants():
        for start in LR_STARTS:
            rows = [r for r in result["rows"] if r["unroll"] == unroll_steps and r["start"] == start
                    and r.get("outer", "soft_error") == outer]
            if not rows:
                continue
            rates = [r["final_rate"] for r in rows]
            accuracy = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
            grids = [r["grid"] for r in rows if r.get("grid")]
            best = [grid["lrs"][_best(grid)]
                    for grid in grids]
            best_accuracy = [grid["test_accuracy"][grid["lrs"].index(rate)] for grid, rate in zip(grids, best)]
            what = "validation soft error" if outer == "soft_error" else "next training batch (hypergradient descent)"
            lines.append([str(unroll_steps), what, f"{start:g}", f"{statistics.mean(rates):.3g} ± "
                          f"{statistics.stdev(rates) if len(rates) > 1 else 0:.2g}",
                          f"{100 * statistics.mean(accuracy):.1f}" if accuracy else "-",
                          f"{', '.join(sorted({f'{rate:g}' for rate in best}))}: "
                          f"{100 * statistics.mean(best_accuracy):.1f}" if grids else "-", str(len(rows))])
    return markdown_table(header, lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.online", description=__doc__.splitlines()[0])
    parser.add_argument("study", choices=("reweight", "lr"))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--hd", action="store_true", help="lr: only hypergradient descent's rows, added to the "
                        "result file's")
    parser.add_argument("--runs-dir", default="runs/online_study")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    out_dir = Path(args.runs_dir)
    started = time.perf_counter()
    if args.study == "reweight":
        result: dict[str, Any] = {"rows": reweight(args.seeds, out_dir, args.cases, args.methods)}
        table = reweight_table(result)
    else:
        result = learning_rate(args.seeds, out_dir, [HD] if args.hd else _variants())
        if args.hd:  # beside the rows already measured, each with its own command
            earlier = read(args.out or RESULTS / "online_lr.json")
            result["rows"] = [row for row in earlier["rows"] if row.get("outer", "soft_error") != HD[1]] + result["rows"]
            result["earlier_command"] = earlier["command"]
        table = lr_table(result)
        lr_figure(result)
    given = list(argv if argv is not None else sys.argv[1:])
    if "--runs-dir" in given:  # where the runs went changes no number: the command a reader reruns leaves it out
        at = given.index("--runs-dir")
        del given[at:at + 2]
    command = f"python -m benchmarks.online {' '.join(given)}"
    if "earlier_command" in result:
        earlier = result.pop("earlier_command")
        command = earlier if "--hd" in earlier else f"{earlier}; {command}"
    result.update(benchmark="online", study=args.study, seeds=args.seeds, command=command.strip(),
                  machine=machine(torch.device("cpu")), wall_seconds=time.perf_counter() - started)
    write(result, args.out or RESULTS / f"online_{args.study}.json")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
