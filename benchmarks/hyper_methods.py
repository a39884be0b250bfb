"""One problem's hypergradient by several methods at the same meta-parameters and tasks: seconds per
outer step, and how far each is from the exact (unrolled) hypergradient.

    python -m benchmarks.hyper_methods weight_decay       # configs/mnist1d_weight_decay.yaml
    python -m benchmarks.hyper_methods weight_decay --quick inner.steps=20

For each method (inner.mode; truncated: the last 50 steps) the config's meta-batch of tasks
(iteration 0) is drawn once and the hypergradient of the config's initial phi computed by
distmaml.meta.meta_gradient: the median over --windows calls of its seconds (one thread) is the
outer step's cost (the outer Adam update is negligible beside it). Against the unrolled
second-order hypergradient (recomputed in sqrt(T) segments: exact for the T-step training run that
the outer loss measures), each method reports the cosine of the angle between them and the ratio
of their norms. The implicit methods assume the training run ends at a stationary point of its
loss; where T steps leave it far from one, they answer a different question, and the cosine says
how different.

Writes benchmarks/results/hyper_methods_<problem>.json.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from typing import Any

import torch

from benchmarks.common import REPO, RESULTS, config_for, machine, median_seconds, write
from benchmarks.hyper_seeds import CONFIGS
from distmaml.build import build
from distmaml.meta import meta_gradient
from distmaml.rng import STREAM_TRAIN

TRUNCATE = 50  # the truncated method's steps (all of them where T is shorter)
METHODS = {"second_order": ["inner.mode=second_order", "inner.checkpoint=auto"],
           "truncated": ["inner.mode=truncated", "inner.checkpoint=auto"],
           "implicit": ["inner.mode=implicit"], "neumann": ["inner.mode=neumann"]}


def hypergradient(problem_name: str, method: str, overrides: list[str], windows: int) -> dict[str, Any]:
    config = config_for(REPO / CONFIGS[problem_name], [*overrides, *METHODS[method]])
    if method == "truncated":
        config = config_for(REPO / CONFIGS[problem_name], [*overrides, *METHODS[method],
                                                          f"inner.truncate={min(TRUNCATE, config.inner.steps)}"])
    torch.manual_seed(config.train.seed)
    learner = build(config)
    tasks = learner.family.sample(STREAM_TRAIN, 0, torch.arange(config.train.meta_batch))
    found = {}

    def run() -> None:
        found["grad"] = meta_gradient(learner.problem, learner.theta, tasks, learner.inner).grad_sum

    seconds = median_seconds(run, windows, 0.0)
    vector = torch.cat([g.reshape(-1).double() for g in found["grad"].values()])
    return {"method": method, "seconds_per_outer_step": seconds, "inner_steps": config.inner.steps,
            "tasks": config.train.meta_batch, "vector": vector}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("problem", choices=list(CONFIGS))
    parser.add_argument("overrides", nargs="*", help="key.sub=value settings for every method")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--windows", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="one window")
    parser.add_argument("--out", default=None,
                        help="JSON file (default benchmarks/results/hyper_methods_<problem>.json)")
    args = parser.parse_intermixed_args(argv)
    torch.set_num_threads(1)
    started = time.time()
    overrides = ["engine.threads=1", *args.overrides]
    found = [hypergradient(args.problem, method, overrides, 1 if args.quick else args.windows)
             for method in args.methods]
    exact = next((f["vector"] for f in found if f["method"] == "second_order"), None)
    rows = []
    for f in found:
        vector = f.pop("vector")
        if exact is not None:
            f["cosine_to_unrolled"] = float(vector @ exact / (vector.norm() * exact.norm()))
            f["norm_ratio_to_unrolled"] = float(vector.norm() / exact.norm())
        rows.append(f)
        print(f"{f['method']:>13}: {f['seconds_per_outer_step']:8.2f} s per outer step, cosine to unrolled "
              f"{f.get('cosine_to_unrolled', math.nan):+.3f}, "
              f"norm ratio {f.get('norm_ratio_to_unrolled', math.nan):.3f}", flush=True)
    result = {"benchmark": "hyper_methods", "problem": args.problem, "config": CONFIGS[args.problem],
              "overrides": args.overrides,
              "command": " ".join(["python -m benchmarks.hyper_methods",
                                   *(argv if argv is not None else sys.argv[1:])]),
              "machine": machine(torch.device("cpu")), "windows": 1 if args.quick else args.windows,
              "wall_seconds": time.time() - started, "rows": rows}
    print(f"wrote {write(result, args.out or RESULTS / f'hyper_methods_{args.problem}.json')}")
    return result


if __name__ == "__main__":
    main()
