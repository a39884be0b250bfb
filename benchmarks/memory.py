"""Peak memory of one meta-iteration (MetaStep) per mode, checkpointing setting and K, measured, beside
the estimate the trainer makes before its first iteration (distmaml.engine.memory).

    python -m benchmarks.memory                      # this CPU: the README's memory tables
    python -m benchmarks.memory --device cuda
    python -m benchmarks.memory --only resnet12

Every case runs in a fresh process, so that a peak is that case's alone. One meta-iteration runs
first (it creates the gradients, Adam's state and the libraries' one-time caches); the second is
measured: on the CPU, the high-water mark of the resident set (VmHWM, reset just before the
iteration through /proc/self/clear_refs) minus the resident set then, with glibc told to hand
large blocks straight back to the system
(MALLOC_MMAP_THRESHOLD_) so that what is resident is what is live, and on CUDA the allocator's
max_memory_allocated minus what was allocated before. The weights, their gradients and Adam's two
moments (4 x the parameters), already resident then, are added back, as the estimate counts them.
Implicit mode is measured the same way as the others.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import OMNIGLOT_SHAPED, MINIIMAGENET_SHAPED, REPO, RESULTS, config_for, machine, meta_step, write

SINE = REPO / "configs/sine_maml.yaml"
OMNIGLOT = REPO / "configs/omniglot_5w1s.yaml"
MINIIMAGENET = REPO / "configs/miniimagenet_5w1s.yaml"
WIDE_SINE = ["model.hidden=[256, 256]", "task.support=100", "task.query=100", "train.meta_batch=25"]
MODES = {"second order": ["inner.mode=second_order"],
         "second order, checkpoint=every_step": ["inner.mode=second_order", "inner.checkpoint=every_step"],
         "second order, checkpoint=auto": ["inner.mode=second_order", "inner.checkpoint=auto"],
         "truncated T=10, checkpoint=auto": ["inner.mode=truncated", "inner.truncate=10", "inner.checkpoint=auto"],
         "first order": ["inner.mode=first_order"],
         "implicit": ["inner.mode=implicit", "maml.proximal=5.0", "implicit.damping=15.0"]}


def cases(quick: bool, tiny: bool = False) -> list[dict[str, Any]]:
    if tiny:  # the test suite's: two small cases, end to end
        small = ["model.hidden=[64, 64]", "task.support=40", "task.query=40", "train.meta_batch=8", "inner.steps=3"]
        return [dict(group="sine", model="MLP 1-64-64-1", base=str(SINE), setting=name, inner_steps=3,
                     overrides=[*small, *MODES[name]]) for name in ("second order", "second order, checkpoint=auto")]
    out = []
    steps = (10, 50) if quick else (10, 50, 100)
    for k in steps:
        for name, settings in MODES.items():
            out.append(dict(group="sine", model="MLP 1-256-256-1", base=str(SINE), setting=name, inner_steps=k,
                            overrides=[*WIDE_SINE, *settings, f"inner.steps={k}"]))
    conv = [*OMNIGLOT_SHAPED, "model.channels=32", "train.meta_batch=4"]
    for k in ((1, 10) if quick else (1, 10, 100)):
        for name in ("second order", "second order, checkpoint=auto"):
            out.append(dict(group="conv4", model="Conv-4 (32 filters), Omniglot-shaped 5-way 1-shot, 15 query",
                            base=str(OMNIGLOT), setting=name, inner_steps=k,
                            overrides=[*conv, *MODES[name], f"inner.steps={k}"]))
    if not quick:
        resnet = [*MINIIMAGENET_SHAPED, "model.kind=resnet12", "train.meta_batch=2", "inner.steps=5"]
        for name in ("second order", "second order, checkpoint=auto"):
            out.append(dict(group="resnet12", model="ResNet-12, 84x84, 5-way 1-shot, 15 query",
                            base=str(MINIIMAGENET), setting=name, inner_steps=5, overrides=[*resnet, *MODES[name]]))
    return out


def measure(case: dict[str, Any], device: str) -> dict[str, Any]:
    """In this (fresh) process: one meta-iteration's peak, its seconds, and the trainer's estimate."""
    from distmaml.engine import memory
    from distmaml.engine.preflight import probe
    from distmaml.rng import STREAM_TRAIN

    config = config_for(case["base"], [*case["overrides"], f"engine.device={device}", "engine.threads=1"])
    torch.set_num_threads(1)
    step, learner = meta_step(config, device)
    weights = sum(p.numel() * p.element_size() for p in learner.theta.values())
    step(0)  # creates gradients, Adam's state and one-time caches; the next iteration is measured
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the high-water mark starts again from here
        before = _status_bytes("VmRSS")
    started = time.perf_counter()
    step(1)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
    else:
        peak = _status_bytes("VmHWM") - before
    seconds = time.perf_counter() - started
    shapes = learner.family.to("meta").sample(STREAM_TRAIN, 0, torch.arange(config.train.meta_batch, device="meta"))
    found = memory.estimate(learner.problem, learner.theta, shapes, learner.inner, probe,
                            config.inner.multi_step_loss)
    measured = peak + 4 * weights
    return {**{k: v for k, v in case.items() if k != "base"}, "device": device, "measured_mib": measured / 2 ** 20,
            "estimate_mib": found.peak_bytes / 2 ** 20, "estimate_over_measured": found.peak_bytes / measured,
            "seconds_per_iteration": seconds}


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (kB there) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--only", nargs="+", help="groups: sine conv4 resnet12")
    parser.add_argument("--quick", action="store_true", help="fewer and smaller cases")
    parser.add_argument("--tiny", action="store_true", help="two small cases (the tests')")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/memory_<device>.json)")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # the fresh process's side
    args = parser.parse_args(argv)
    if args.case:
        print(json.dumps(measure(json.loads(args.case), args.device)))
        return {}
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    rows, started = [], time.time()
    for case in cases(args.quick, args.tiny):
        if args.only and case["group"] not in args.only:
            continue
        proc = subprocess.run([sys.executable, "-m", "benchmarks.memory", "--device", args.device, "--case",
                               json.dumps(case)], capture_output=True, text=True, env=env, cwd=REPO)
        if proc.returncode != 0:
            raise SystemExit(f"case {case['setting']} K={case['inner_steps']} failed:\n{proc.stderr[-2000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        row = rows[-1]
        print(f"{row['group']:>9} K={row['inner_steps']:<4} {row['setting']:<40} measured {row['measured_mib']:9.1f} "
              f"MiB  estimate {row['estimate_mib']:9.1f} MiB  ({row['estimate_over_measured']:.2f}x)  "
              f"{row['seconds_per_iteration']:.2f} s", flush=True)
    result = {"benchmark": "memory", "command": " ".join(["python -m benchmarks.memory", *(argv or sys.argv[1:])]),
              "machine": machine(torch.device(args.device)), "wall_seconds": time.time() - started, "rows": rows}
    out = write(result, args.out or RESULTS / f"memory_{args.device}.json")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
