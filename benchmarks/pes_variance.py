"""The PES estimator's variance on the MNIST-1D learning-rate problem, against the truncations since a
pair's start, sigma, the truncation U and the dimension of phi.

    python -m benchmarks.pes_variance          # -> results/pes_variance.json

The set-up of configs/mnist1d_lr_pes.yaml (the rows of U and dim phi at sigma 0.3) with phi frozen at a rate of 0.5 (log rate, or a five-block
schedule at 0.5 for dim phi = 5), and the 15,000 per-weight decays of configs/mnist1d_weight_decay.yaml
(at their initial 1e-3, a horizon of its 300 steps): PAIRS antithetic pairs start fresh (counter 0, no
accumulated perturbation) and run the whole horizon in truncations of U steps; at each truncation every
pair's estimate (L+ - L-) xi / (2 sigma^2) is recorded. Reported per setting: the trace of the pairs'
covariance (the variance of a one-pair estimate, summed over phi's entries) at 10 %, 50 % and 100 %
of the horizon, its growth exponent b in variance ~ t^b over the truncations t since the start (a
least-squares line in log-log), and the squared norm of the mean estimate over the pairs against what
noise alone would give it (the variance over the pairs): where the two are alike, the estimate at
that many pairs carries no detectable signal. The variance of
the mean over P pairs is the table's over P (the pairs are independent). Particles staggered over the
horizon see, on average, half of it. A pair whose run diverges (a large sigma's perturbed rate) is
left out of the statistics from then on, and counted (training drops and restarts it).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from typing import Any

import torch

from benchmarks.common import REPO, RESULTS, machine, write
from benchmarks.tables import markdown_table
from distmaml.build import build
from distmaml.config import load_config
from distmaml.meta import meta_gradient
from distmaml.meta.functional import Noise
from distmaml.meta.online import OnlineProblem, carried_on, fresh_runs, with_rule
from distmaml.rng import STREAM_ONLINE

PAIRS = 32
RATE = 0.5
LR = "configs/mnist1d_lr_pes.yaml"
# The per-weight decays of configs/mnist1d_weight_decay.yaml (15,000 log decays at 1e-3, full-batch SGD at
# 0.5) as PES would learn them: runs of its 300 steps, truncations of 10.
DECAY = ["online.horizon=300", "inner.mode=pes", "inner.steps=10", "train.meta_batch=2"]
# (label, config, sigma, U, overrides)
SETTINGS = [("sigma 0.03", LR, 0.03, 10, []), ("sigma 0.1 (the config's)", LR, 0.1, 10, []), ("sigma 0.3", LR, 0.3, 10, []),
            ("sigma 0.6", LR, 0.6, 10, []),
            ("noise reuse (es.reuse_noise), sigma 0.1", LR, 0.1, 10, ["es.reuse_noise=true"]),
            ("U = 5", LR, 0.3, 5, []), ("U = 25", LR, 0.3, 25, []),
            ("dim phi = 5 (five-block schedule)", LR, 0.3, 10, ["inner.schedule_blocks=5"]),
            ("dim phi = 15,000 (per-weight decay, mnist1d_weight_decay)", "configs/mnist1d_weight_decay.yaml", 0.3, 10,
             DECAY)]


def measure(config_path: str, sigma: float, unroll_steps: int, overrides: list[str], pairs: int,
            seed: int = 0) -> dict[str, Any]:
    rate = [f"inner.lr={RATE}"] if config_path == LR else []
    config = load_config(REPO / config_path, [
        *overrides, f"es.sigma={sigma}", f"online.unroll={unroll_steps}", f"inner.steps={unroll_steps}", *rate,
        f"online.runs={2 * pairs}", f"train.meta_batch={2 * pairs}", f"train.seed={seed}", "logging.progress=false",
        "engine.memory_check=false"])
    learner = build(config)
    method = learner.inner.method
    problem = OnlineProblem(learner.problem, unroll_steps)
    inner = with_rule(learner.inner, unroll_steps)
    phi = {name: value.detach() for name, value in learner.theta.items()}
    index = torch.arange(2 * pairs)
    tasks = learner.family.sample(STREAM_ONLINE, 0, index // 2)
    runs = fresh_runs(learner.problem, learner.inner.rule, phi, tasks, torch.zeros(2 * pairs, dtype=torch.int64))
    runs = runs._replace(carry=method.carry_init(phi, 2 * pairs))
    horizon = config.online.horizon
    truncations = horizon // unroll_steps
    traces, mean_norms, dropped = [], [], 0
    for tau in range(truncations):
        result = meta_gradient(problem, phi, runs.as_tasks(), inner, noise=Noise(torch.tensor(1000 + tau), index))
        accumulated = result.carried["carry"]["perturbation"]
        gap = result.task_losses[0::2] - result.task_losses[1::2]
        scales = method.scales(phi)
        each = torch.cat([(gap[:, None] * value[0::2].reshape(pairs, -1)) / (2 * scales[name] ** 2)
                          for name, value in accumulated.items()], 1).double()  # [pairs, dim phi]
        finite = torch.isfinite(each).all(1)  # a pair whose run diverged would be dropped and reset in training
        dropped = max(dropped, int((~finite).sum()))
        each = each[finite]
        traces.append(float(each.var(0).sum()))
        mean_norms.append(float((each.mean(0) ** 2).sum()))
        runs = carried_on(runs, result.carried, unroll_steps)
    t = [math.log(i + 1) for i in range(truncations)]
    v = [math.log(max(value, 1e-300)) for value in traces]
    slope = _slope(t[truncations // 10:], v[truncations // 10:])
    at = {f"{int(100 * fraction)} %": traces[max(int(fraction * truncations) - 1, 0)] for fraction in (0.1, 0.5, 1.0)}
    return {"config": config_path, "sigma": sigma, "unroll": unroll_steps, "horizon": horizon,
            "dim_phi": sum(value.numel() for value in phi.values()), "pairs": pairs, "variance_at": at,
            "growth_exponent": slope, "variance_mean_over_horizon": statistics.mean(traces),
            "mean_squared_norm_over_horizon": statistics.mean(mean_norms), "pairs_not_finite": dropped,
            "traces": traces}


def _slope(x: list[float], y: list[float]) -> float:
    mx, my = statistics.mean(x), statistics.mean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def table(result: dict[str, Any]) -> str:
    lines = []
    for label, row in result["rows"].items():
        at = row["variance_at"]
        lines.append([label, f"{at['10 %']:.3g}", f"{at['50 %']:.3g}", f"{at['100 %']:.3g}",
                      f"{row['growth_exponent']:.2f}", f"{row['variance_mean_over_horizon']:.3g}",
                      f"{row['mean_squared_norm_over_horizon']:.3g}",
                      f"{row['variance_mean_over_horizon'] / row['pairs']:.3g}", str(row["pairs_not_finite"])])
    return markdown_table(["setting", "one pair's variance at 10 % of the horizon", "at 50 %", "at 100 %",
                           "growth exponent b (variance ~ t^b)", "mean over the horizon (staggered pairs)",
                           "squared norm of the mean over the pairs", "what noise alone gives it (variance / pairs)",
                           "pairs not finite (left out)"], lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.pes_variance", description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=PAIRS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    rows = {}
    for label, config_path, sigma, unroll_steps, overrides in SETTINGS:
        rows[label] = measure(config_path, sigma, unroll_steps, overrides, args.pairs)
        print(label, {k: f"{v:.3g}" for k, v in rows[label]["variance_at"].items()}, flush=True)
    result = {"benchmark": "pes_variance", "rows": rows, "rate": RATE,
              "command": f"python -m benchmarks.pes_variance {' '.join(argv if argv is not None else sys.argv[1:])}".strip(),
              "machine": machine(torch.device("cpu")), "wall_seconds": time.perf_counter() - started}
    write(result, args.out or RESULTS / "pes_variance.json")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
