"""Long unrolls: memory and time of one learning-rate hypergradient against T, stored and recomputed,
and how noisy the hypergradient is.

    python -m benchmarks.unrolls                       # T = 10 ... 1,000, this CPU

The MNIST-1D learning-rate problem (configs/mnist1d_lr.yaml: a 40-100-100-10 MLP, SGD with batch
100), 16 random initialisations. For each T: the peak resident memory above a fresh process's
baseline and the seconds of one hypergradient, with the unroll stored (inner.checkpoint=none) and
recomputed in sqrt(T) segments (auto), timed on a second call; and, at two learning rates, the
mean and standard deviation over the 16 initialisations of each one's own hypergradient
d L_val / d log lr (L_val: the validation cross-entropy, training_run.outer=loss). Long unrolls at large
rates are chaotic (Metz et al. 2019): the spread across initialisations grows with T, and averaging
over a meta-batch of initialisations is what tames it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

import torch

from benchmarks.common import REPO, RESULTS, machine, write
from distmaml.build import build
from distmaml.config import load_config
from distmaml.meta import meta_gradient, tasks_slice

TASKS = 16

CASE = r"""
import json, sys, time, torch
torch.set_num_threads(1)
from distmaml.build import build
from distmaml.config import load_config
from distmaml.meta import meta_gradient
steps, checkpoint = int(sys.argv[1]), sys.argv[2]
config = load_config("configs/mnist1d_lr.yaml", [f"inner.steps={steps}", f"inner.checkpoint={checkpoint}",
                                                  "train.meta_batch=16", "inner.lr=0.1", "training_run.outer=loss"])
torch.manual_seed(0)
learner = build(config)
tasks = learner.family.sample(0, 0, torch.arange(16))
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
meta_gradient(learner.problem, learner.theta, tasks, learner.inner)  # the first call also pays one-time set-up
started = time.perf_counter()
meta_gradient(learner.problem, learner.theta, tasks, learner.inner)
print(json.dumps({"peak_mib": (status("VmHWM") - before) / 2 ** 20, "seconds": time.perf_counter() - started}))
"""


def memory_and_time(steps: int, checkpoint: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", CASE, str(steps), checkpoint], cwd=REPO, capture_output=True,
                          text=True, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "",
                                          "MALLOC_MMAP_THRESHOLD_": "65536"})
    if proc.returncode != 0:
        raise SystemExit(f"T={steps} {checkpoint} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def spread(steps: int, rate: float) -> dict:
    """Each initialisation's own hypergradient, float64: mean and standard deviation over them."""
    config = load_config(REPO / "configs/mnist1d_lr.yaml", [f"inner.steps={steps}", f"inner.lr={rate}",
                                                            "inner.checkpoint=auto", "engine.dtype=float64",
                                                            "training_run.outer=loss"])
    torch.manual_seed(0)
    learner = build(config)
    tasks = learner.family.sample(0, 0, torch.arange(TASKS))
    values = [meta_gradient(learner.problem, learner.theta, tasks_slice(tasks, i, i + 1), learner.inner)
              .grad_sum["inner.lr.log_schedule"].item() for i in range(TASKS)]
    finite = [v for v in values if v == v and abs(v) != float("inf")]
    return {"rate": rate, "mean": statistics.mean(finite) if finite else float("nan"),
            "std": statistics.stdev(finite) if len(finite) > 1 else float("nan"), "finite": len(finite)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[10, 30, 100, 300, 1000])
    parser.add_argument("--rates", type=float, nargs="+", default=[0.1, 1.0])
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/unrolls_cpu.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started, rows = time.time(), []
    for steps in args.steps:
        row = {"inner_steps": steps}
        for checkpoint in ("none", "auto"):
            row[checkpoint] = memory_and_time(steps, checkpoint)
        row["spread"] = [spread(steps, rate) for rate in args.rates]
        rows.append(row)
        spreads = ", ".join(f"lr {s['rate']:g}: {s['mean']:+.3g} ± {s['std']:.3g}" for s in row["spread"])
        print(f"T={steps:5d}  stored {row['none']['peak_mib']:8.1f} MiB {row['none']['seconds']:6.2f} s   recomputed "
              f"{row['auto']['peak_mib']:8.1f} MiB {row['auto']['seconds']:6.2f} s   hypergradient {spreads}", flush=True)
    result = {"benchmark": "unrolls", "command": " ".join(["python -m benchmarks.unrolls", *(argv or sys.argv[1:])]),
              "machine": machine(torch.device("cpu")), "tasks": TASKS, "wall_seconds": time.time() - started,
              "rows": rows}
    print(f"wrote {write(result, args.out or RESULTS / 'unrolls_cpu.json')}")
    return result


if __name__ == "__main__":
    main()
