"""Influence balancing (Tallec & Ollivier 2017, as Vicol et al. 2021 reproduce it): truncated backpropagation
and truncated ES converge to the wrong parameter, PES to the right one.

    python -m benchmarks.influence_balancing          # -> results/influence_balancing.json

A linear system s_{t+1} = A s_t + theta (+1 x 10, -1 x 13), A = 0.5 (I + the shift), s_0 = 1, the loss
1/2 (s_t[0] - 1)^2 after every truncation of K steps, one state that never starts again. A larger theta
raises s[0] at once (through the 10 positive entries) but lowers it in the long run (the 13 negative
ones reach s[0] later): at the steady state s[0] = -6 theta, so the loss is least at theta* = -1/6.
Each method takes ITERATIONS plain gradient steps on theta from 0.5 at LR (the paper's), its estimate
from the current truncation only:

    tbptt   the exact gradient through the truncation's K steps from the current state (K = 1, 10, 100)
    es      truncated ES: 500 antithetic pairs of K = 1 step from the current state, which then moves
            at theta (distmaml's `es` method on the persistent state)
    pes     PES: 500 antithetic pairs of persistent particles, K = 1 (distmaml's `pes` method)

Reported: the final theta, and the loss of a 500-step run from s_0 at it (the long-horizon loss).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch

from benchmarks.common import RESULTS, machine, write
from benchmarks.tables import markdown_table
from distmaml.meta import Inner, make_rule, meta_gradient
from distmaml.meta.functional import Noise
from distmaml.meta.methods import ES, PES
from distmaml.meta.online import OnlineProblem, Runs, advance, carried_on, with_rule

DTYPE = torch.float64
STATES, POSITIVE = 23, 10
SHIFT = 0.5 * torch.eye(STATES, dtype=DTYPE) + 0.5 * torch.diag(torch.ones(STATES - 1, dtype=DTYPE), 1)
SIGNS = torch.tensor([1.0] * POSITIVE + [-1.0] * (STATES - POSITIVE), dtype=DTYPE)
THETA0, BEST = 0.5, -1.0 / 6.0
ITERATIONS, LR, SIGMA, PAIRS = 3000, 1e-4, 0.1, 500


class Influence:
    """The system as a distmaml problem: one SGD step at rate 1 on 1/2 |s|^2 - (A s_const + theta signs) . s
    is one step of the system (forward only: the evolution strategies never differentiate a step)."""

    modes = ("episodic", "online")

    def meta_parameters(self):
        return {"theta": torch.tensor([THETA0], dtype=DTYPE)}

    def inner_template(self):
        return {"s": torch.zeros(STATES, dtype=DTYPE)}

    def start(self, phi, task):
        return {"s": torch.ones(STATES, dtype=DTYPE)}

    def inner_loss(self, weights, phi, task, step):
        s = weights["s"]
        return 0.5 * (s * s).sum() - ((SHIFT @ s.detach() + phi["theta"] * SIGNS) * s).sum()

    def outer_loss(self, weights, phi, task):
        return 0.5 * (weights["s"][0] - 1) ** 2

    def metrics(self, weights, phi, task):
        return {"loss": self.outer_loss(weights, phi, task)}


def system_steps(state: torch.Tensor, theta: torch.Tensor, steps: int) -> torch.Tensor:
    for _ in range(steps):
        state = SHIFT @ state + theta * SIGNS
    return state


def long_loss(theta: float, steps: int = 500) -> float:
    return float(0.5 * (system_steps(torch.ones(STATES, dtype=DTYPE), torch.tensor(theta, dtype=DTYPE), steps)[0] - 1) ** 2)


def tbptt(steps: int, iterations: int) -> list[float]:
    theta, state, trajectory = torch.tensor(THETA0, dtype=DTYPE), torch.ones(STATES, dtype=DTYPE), [THETA0]
    for _ in range(iterations):
        at = theta.clone().requires_grad_()
        after = system_steps(state, at, steps)
        gradient, = torch.autograd.grad(0.5 * (after[0] - 1) ** 2, at)
        state, theta = after.detach(), theta - LR * gradient
        trajectory.append(float(theta))
    return trajectory


def evolution(method: Any, particles: int, iterations: int) -> list[float]:
    problem = OnlineProblem(Influence(), 1)
    inner = with_rule(Inner(make_rule("sgd", lr=1.0), 1, method), 1)
    theta = torch.tensor([THETA0], dtype=DTYPE)
    carry = method.carry_init({"theta": theta}, particles) if hasattr(method, "carry_init") else None
    runs = Runs({"run": torch.arange(particles)}, {"s": torch.ones(particles, STATES, dtype=DTYPE)}, {},
                torch.zeros(particles, dtype=torch.int64), carry)
    index, trajectory = torch.arange(particles), [THETA0]
    for iteration in range(iterations):
        phi = {"theta": theta.clone().requires_grad_()}
        result = meta_gradient(problem, phi, runs.as_tasks(), inner, noise=Noise(torch.tensor(iteration), index))
        gradient = result.grad_sum["theta"] / particles
        runs = (carried_on(runs, result.carried, 1) if result.carried is not None
                else advance(problem, inner, {"theta": theta}, runs, 1))
        theta = theta - LR * gradient
        trajectory.append(float(theta))
    return trajectory


def table(result: dict[str, Any]) -> str:
    lines = [[name, f"{row['final_theta']:.4f}", f"{row['long_horizon_loss']:.3g}"]
             for name, row in result["rows"].items()]
    lines.append(["the right answer", f"{BEST:.4f}", f"{long_loss(BEST):.3g}"])
    return markdown_table(["method", "theta after the run", "loss of a 500-step run at it"], lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.influence_balancing",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=ITERATIONS)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    runs = {"tbptt K = 1": lambda: tbptt(1, args.iterations), "tbptt K = 10": lambda: tbptt(10, args.iterations),
            "tbptt K = 100": lambda: tbptt(100, args.iterations),
            f"es (truncated), K = 1, {PAIRS} pairs": lambda: evolution(ES(sigma=SIGMA, pairs=PAIRS), 1, args.iterations),
            f"pes, K = 1, {PAIRS} pairs": lambda: evolution(PES(sigma=SIGMA), 2 * PAIRS, args.iterations)}
    rows = {}
    for name, run in runs.items():
        started = time.perf_counter()
        trajectory = run()
        rows[name] = {"final_theta": trajectory[-1], "long_horizon_loss": long_loss(trajectory[-1]),
                      "seconds": time.perf_counter() - started, "trajectory": trajectory[::50]}
        print(name, f"theta {trajectory[-1]:.4f}", flush=True)
    result = {"benchmark": "influence_balancing", "rows": rows, "best_theta": BEST,
              "command": f"python -m benchmarks.influence_balancing {' '.join(argv if argv is not None else sys.argv[1:])}".strip(),
              "machine": machine(torch.device("cpu"))}
    write(result, args.out or RESULTS / "influence_balancing.json")
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
