"""The same meta-iterations timed in this tree and in another commit's, interleaved in one run.

    python -m benchmarks.versions --against 2677654        # this tree / that commit, per case

Each tree gets a worker process of its own (one CPU thread) that builds training's MetaStep for a
case exactly as `distmaml train` would. The workers then take turns: one window of at least
--seconds in one, one in the other, --windows times, so that whatever else the machine is doing
lands on both alike. Reported: the median milliseconds per meta-iteration of each and their ratio.
The other commit is checked out with `git worktree` into a temporary folder and removed afterwards.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.common import REPO, RESULTS, machine, write

CASES = {
    "sine, K = 5, second order": ("configs/sine_maml.yaml", ["inner.mode=second_order", "inner.steps=5"], False),
    "Omniglot-shaped Conv-4 5-way 1-shot, K = 1": ("configs/omniglot_5w1s.yaml", ["inner.steps=1"], True),
    "MNIST-1D learned schedule, T = 100": ("configs/mnist1d_lr.yaml", ["inner.steps=100"], False),
}

WORKER = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from benchmarks.common import OMNIGLOT_SHAPED, config_for, meta_step
config_path, settings, shaped = json.loads(sys.stdin.readline())
config = config_for(config_path, [*(OMNIGLOT_SHAPED if shaped else []), *settings, "engine.device=cpu"])
step, _ = meta_step(config, "cpu")
counter = iter(range(10 ** 9))
for _ in range(5):
    step(next(counter))
print("ready", flush=True)
for line in sys.stdin:
    seconds, calls, started = float(line), 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        step(next(counter))
        calls += 1
    print(1e3 * (time.perf_counter() - started) / calls, flush=True)
"""


def start_worker(tree: Path, case: tuple) -> subprocess.Popen:
    worker = subprocess.Popen([sys.executable, "-c", WORKER], cwd=tree, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, env={"PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1", "PATH": ""})
    worker.stdin.write(json.dumps([str(tree / case[0]), case[1], case[2]]) + "\n")
    worker.stdin.flush()
    if worker.stdout.readline().strip() != "ready":
        raise SystemExit(f"the worker in {tree} failed to build {case}")
    return worker


def window(worker: subprocess.Popen, seconds: float) -> float:
    worker.stdin.write(f"{seconds}\n")
    worker.stdin.flush()
    return float(worker.stdout.readline())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", required=True, help="a commit (or branch) of this repository")
    parser.add_argument("--windows", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/versions_cpu.json)")
    args = parser.parse_args(argv)
    commit = subprocess.run(["git", "rev-parse", "--short", args.against], cwd=REPO, capture_output=True, text=True,
                            check=True).stdout.strip()
    here = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        other = Path(folder) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", str(other), commit], cwd=REPO, check=True,
                       capture_output=True)
        try:
            for name, case in CASES.items():
                workers = {"this tree": start_worker(REPO, case), commit: start_worker(other, case)}
                times = {label: [] for label in workers}
                for _ in range(args.windows):
                    for label, worker in workers.items():
                        times[label].append(window(worker, args.seconds))
                for worker in workers.values():
                    worker.stdin.close()
                    worker.wait()
                medians = {label: statistics.median(values) for label, values in times.items()}
                rows.append({"case": name, "ms_this_tree": medians["this tree"], "ms_other": medians[commit],
                             "ratio": medians["this tree"] / medians[commit], "windows": times})
                print(f"{name:<45} this tree ({here} + changes) {medians['this tree']:7.2f} ms   {commit} "
                      f"{medians[commit]:7.2f} ms   ratio {rows[-1]['ratio']:.3f}", flush=True)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(other)], cwd=REPO, capture_output=True)
    import torch

    result = {"benchmark": "versions", "command": " ".join(["python -m benchmarks.versions", *(argv or sys.argv[1:])]),
              "this_tree": here, "against": commit, "machine": machine(torch.device("cpu")), "rows": rows}
    print(f"wrote {write(result, args.out or RESULTS / 'versions_cpu.json')}")
    return result


if __name__ == "__main__":
    main()
