"""Antithetic evolution strategies by distmaml and by TorchOpt's zero-order differentiation: equal first, then time.

    python -m benchmarks.peers_es                  # -> results/peers_es_cpu.json
    python -m benchmarks.peers_es --quick

The problem: MAML on one sine task of configs/sine_maml.yaml (the 1-40-40-1 MLP, 10 support and 10
query points), K = 5 inner SGD steps at 0.01; phi is the MLP's initial weights (1,761 entries), and
f(phi) the query loss after the K steps. distmaml: the `es` method (inner.mode=es, episodic: over
the whole episode), all particles of the task in one batched unroll. TorchOpt:
`torchopt.diff.zero_order(method="antithetic")` around a plain-PyTorch f (the K steps by
torch.autograd.grad on torch.func.functional_call of the same model; no distmaml code), which
evaluates its 2 x num_samples perturbed unrolls one after another. Both estimate
mean over pairs of (f(phi + sigma z) - f(phi - sigma z)) z / (2 sigma); TorchOpt is handed the same z
(a distribution object that returns distmaml's draws in the order it asks for them).

Equality in float64 first (<= 1e-6 relative); then the seconds per estimate in float32 on one thread
at 16 and 256 particles (8 and 128 antithetic pairs), medians of --windows windows.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch
from torch.func import functional_call

from benchmarks.common import REPO, RESULTS, machine, median_seconds, one_line, write
from benchmarks.tables import markdown_table
from distmaml.build import build
from distmaml.config import load_config
from distmaml.meta import Inner, make_rule, meta_gradient
from distmaml.meta.functional import Noise
from distmaml.meta.methods import ES
from distmaml.meta.methods.evolution import draws
from distmaml.rng import STREAM_TRAIN

TOLERANCE = 1e-6
STEPS, INNER_LR, SIGMA = 5, 0.01, 0.01
PARTICLES = (16, 256)


def setup(dtype: torch.dtype):
    config = load_config(REPO / "configs/sine_maml.yaml", ["logging.progress=false", "engine.memory_check=false",
                                                            "engine.device=cpu",
                                                            f"engine.dtype={str(dtype).removeprefix('torch.')}"])
    learner = build(config)
    task = learner.family.sample(STREAM_TRAIN, 0, torch.arange(1))
    return learner, task


def distmaml_estimate(learner, task, pairs: int, key: int) -> dict[str, torch.Tensor]:
    inner = Inner(make_rule("sgd", lr=INNER_LR), STEPS, ES(sigma=SIGMA, pairs=pairs))
    return meta_gradient(learner.problem, learner.theta, task, inner,
                         noise=Noise(torch.tensor(key), torch.arange(1))).grad_sum


class _Ours:
    """TorchOpt's distribution: distmaml's draws, handed out in the order TorchOpt asks (pair by pair,
    each of phi's tensors in turn)."""

    def __init__(self, z: dict[str, torch.Tensor]):
        self.queue = [value for pair in range(next(iter(z.values())).shape[0]) for value in
                      (z[name][pair] for name in z)]

    def sample(self, sample_shape=torch.Size()):
        value = self.queue.pop(0)
        assert value.shape == sample_shape
        return value


def torchopt_estimate(learner, task, pairs: int, z: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
    import torchopt

    model = learner.model
    names = list(learner.theta)
    support_x, support_y, query_x, query_y = (part[0] for part in task)

    def query_loss_after_steps(*params):
        with torch.enable_grad():  # TorchOpt evaluates f inside its backward pass, where grad mode is off
            weights = {name: value.detach().requires_grad_() for name, value in zip(names, params)}
            for _ in range(STEPS):
                loss = torch.nn.functional.mse_loss(functional_call(model, weights, (support_x,)), support_y)
                grads = torch.autograd.grad(loss, list(weights.values()))
                weights = {name: (value - INNER_LR * g).detach().requires_grad_()
                           for (name, value), g in zip(weights.items(), grads)}
            return torch.nn.functional.mse_loss(functional_call(model, weights, (query_x,)), query_y).detach()

    distribution = _Ours(z) if z is not None else (lambda shape: torch.randn(shape, dtype=support_x.dtype))
    estimate = torchopt.diff.zero_order.zero_order(distribution, method="antithetic", argnums=tuple(range(len(names))),
                                                   num_samples=pairs, sigma=SIGMA)(query_loss_after_steps)
    params = [value.detach().requires_grad_() for value in learner.theta.values()]
    value = estimate(*params)
    grads = torch.autograd.grad(value, params)
    return dict(zip(names, grads))


def check_equal(pairs: int = 16, key: int = 3) -> float:
    learner, task = setup(torch.float64)
    ours = distmaml_estimate(learner, task, pairs, key)
    z = draws(learner.theta, torch.tensor(key), torch.arange(pairs))
    theirs = torchopt_estimate(learner, task, pairs, z)
    flat_ours = torch.cat([value.reshape(-1) for value in ours.values()])
    flat_theirs = torch.cat([theirs[name].reshape(-1) for name in ours])
    return float((flat_ours - flat_theirs).norm() / flat_theirs.norm())


def timings(windows: int, seconds: float) -> list[dict[str, Any]]:
    learner, task = setup(torch.float32)
    rows = []
    for particles in PARTICLES:
        pairs = particles // 2
        row = {"particles": particles}
        for name, run in (("distmaml", lambda: distmaml_estimate(learner, task, pairs, 0)),
                          ("torchopt", lambda: torchopt_estimate(learner, task, pairs, None))):
            try:
                row[name] = median_seconds(run, windows=windows, seconds=seconds)
            except Exception as err:  # a peer that fails is reported, not fatal
                row[name] = None
                row[f"{name}_error"] = one_line(err)
        rows.append(row)
    return rows


def table(result: dict[str, Any]) -> str:
    lines = [[str(row["particles"]), f"{1e3 * row['distmaml']:.1f}" if row.get("distmaml") else "-",
              f"{1e3 * row['torchopt']:.1f}" if row.get("torchopt") else row.get("torchopt_error", "-"),
              f"{row['torchopt'] / row['distmaml']:.1f}×" if row.get("torchopt") and row.get("distmaml") else "-"]
             for row in result["timings"]]
    return markdown_table(["particles", "distmaml ms per estimate", "TorchOpt zero_order ms per estimate",
                           "distmaml's speed-up"], lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers_es", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer and shorter timing windows")
    parser.add_argument("--windows", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    error = check_equal()
    if not error <= TOLERANCE:
        print(f"distmaml's and TorchOpt's ES estimates differ by {error:.2e} relative (> {TOLERANCE:g})", file=sys.stderr)
        return 1
    windows, seconds = (3, 0.3) if args.quick else (args.windows, 1.0)
    result = {"benchmark": "peers_es", "relative_difference_float64": error, "timings": timings(windows, seconds),
              "command": f"python -m benchmarks.peers_es {' '.join(argv if argv is not None else sys.argv[1:])}".strip(),
              "machine": machine(torch.device("cpu"))}
    if not args.quick:
        write(result, args.out or RESULTS / "peers_es_cpu.json")
    print(f"equal to {error:.1e} relative in float64")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
