"""Evolution strategies: phi's gradient from the losses of perturbed unrolls, with no graph at all.

    es    antithetic ES. Episodic: over each task's whole inner loop from problem.start (Salimans et
          al. 2017), `pairs` antithetic pairs per task. Online: truncated ES, the same from each
          run's stored state over its U steps, the state then moved on at the unperturbed phi by the
          schedule, as after every lookahead (biased: a perturbation's effect on later truncations
          is never seen).
    pes   persistent ES (Vicol, Metz & Sohl-Dickstein 2021), online only (with reuse_noise: noise-reuse
          ES, Li et al. 2023, one perturbation per pair's life, the estimate weighted by it). Runs 2p and 2p+1 are an
          antithetic pair: each member keeps its own state, unrolls its U steps at phi + eps and
          phi - eps, and those unrolls *are* its real steps (the method carries the runs on:
          MetaGradient.carried). Each member accumulates the perturbations it has run under since
          its start, xi (+/-), and the estimate weights its loss by that sum, not by the last eps,
          which is what makes it unbiased for the whole trajectory.

A perturbation is eps = sigma (.) z with z ~ N(0, I) drawn counter-based from (Noise.key: the seed
and the outer step, the pair's global index, the entry of phi), so any shard of the pairs draws
what one process would; sigma is one number per tensor of phi (`sigma`, or `sigma_of`'s
"name-prefix=value" where a tensor needs its own: one scale cannot serve a log rate and thousands
of decays alike). The objective is the Gaussian-smoothed one, f_sigma(phi) = E_z f(phi + sigma z),
whose gradient is E[z f(phi + sigma z)] / sigma; per pair

    es:   (f(phi + eps) - f(phi - eps)) eps / (2 sigma^2)
    pes:  (L(+) - L(-)) xi / sigma^2 over the pair's two runs (the engine averages over runs)

where for PES L is the outer loss after the truncation, and the estimate is unbiased for the sum over
truncations of L_tau(phi + eps_1, ..., phi + eps_tau), an independent perturbation per truncation,
while phi is held fixed (tests/meta/test_evolution.py holds both to references that share none of
this code). A perturbed unroll runs every particle's own phi through the rule and the problem: the
phi the unroll passes is not read, each particle's is in its task (`Perturbed`, `PerturbedRule`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_map

from distmaml.meta.functional import MetaGradient, Noise, Params, Tasks, detached, num_tasks
from distmaml.meta.methods.base import MethodError, WithoutUnrollGraph, at_least, refuse_step_weights
from distmaml.meta.rules import LEARNED, Rule
from distmaml.meta.unrolling import starting_state, task_values, unroll
from distmaml.rng import normal


def default_noise(tasks: Tasks, device: torch.device) -> Noise:
    """Key 0 and indices 0..n-1: what a stochastic method draws when its caller gives no Noise."""
    return Noise(torch.zeros((), dtype=torch.int64, device=device),
                 torch.arange(num_tasks(tasks), dtype=torch.int64, device=device))


def draws(phi: Params, key: torch.Tensor, pairs: torch.Tensor) -> Params:
    """z ~ N(0, I) shaped like every tensor of phi, one per pair in `pairs` ([m] global pair indices):
    entry j of phi's t-th tensor for pair p is normal(key, p, t, j)."""
    out = {}
    for position, (name, value) in enumerate(phi.items()):
        entries = torch.arange(value.numel(), dtype=torch.int64, device=value.device)
        z = normal(key, pairs[:, None], position, entries[None, :], dtype=value.dtype, device=value.device)
        out[name] = z.reshape(len(pairs), *value.shape)
    return out


def _leading(scale: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return scale.reshape(-1, *([1] * (like.dim() - 1)))


@dataclass(frozen=True, eq=False)
class Perturbed:
    """A problem whose every task carries its own meta-parameters: task = {"task": the problem's task,
    "phi": that particle's phi}. The phi the unroll passes in is not read."""

    problem: Any
    rule: Rule  # the rule the particles' unroll runs (its state is started here, from the particle's phi)

    def __getattr__(self, name: str) -> Any:
        if name in ("problem", "rule"):
            raise AttributeError(name)
        return getattr(self.problem, name)

    def start(self, phi: Params, task: Any) -> Params:
        return self.problem.start(task["phi"], task["task"])

    def start_state(self, phi: Params, task: Any) -> dict:
        weights = self.start(phi, task)
        return {"rule": starting_state(self.problem, self.rule, task["phi"], task["task"], weights), "phi": task["phi"]}

    def inner_loss(self, weights: Params, phi: Params, task: Any, step) -> torch.Tensor:
        return self.problem.inner_loss(weights, task["phi"], task["task"], step)

    def outer_loss(self, weights: Params, phi: Params, task: Any) -> torch.Tensor:
        return self.problem.outer_loss(weights, task["phi"], task["task"])


@dataclass(frozen=True)
class PerturbedRule:
    """The rule as a particle runs it: its learned entries (step sizes) are the particle's, kept in its state."""

    rule: Rule

    def __getattr__(self, name: str) -> Any:
        if name == "rule":
            raise AttributeError(name)
        return getattr(self.rule, name)

    def step(self, weights: Params, grads: Params, state: dict, learned: Params, step) -> tuple[Params, dict]:
        phi = state["phi"]
        if self.rule.per_step:  # one learned entry per inner step (LSLR): step k reads its own
            last = {name: value.shape[0] - 1 for name, value in phi.items() if name.startswith(LEARNED)}
            phi = {name: value[min(step, last[name])] if name in last else value for name, value in phi.items()}
        new, rule_state = self.rule.step(weights, grads, state["rule"], phi, step)
        return new, {"rule": rule_state, "phi": state["phi"]}


def perturbed_unroll(problem: Any, particle_phi: Params, tasks: Tasks, inner: Any, exact: bool = False):
    """Every particle's inner loop at its own phi (particle dimension first in both): the final weights,
    the rule's state and the outer losses; no graph, or with `exact` (gradcheck's reference) the graph of
    every step back to the particles' phi."""
    rule = inner.rule
    wrapped = Perturbed(problem, rule)
    particles = {"task": tasks, "phi": particle_phi}
    template = {name: value[0].detach() for name, value in particle_phi.items()}  # read by nothing: shapes only
    with torch.enable_grad() if exact else torch.no_grad():
        inner = dataclasses.replace(inner, rule=PerturbedRule(rule))
        result = unroll(wrapped, template, particles, inner, differentiated=inner.steps if exact else 0)
        losses = task_values(wrapped.outer_loss, result.weights, template, particles)
    return result.weights, result.state["rule"], losses


@dataclass(frozen=True)
class _EvolutionStrategy(WithoutUnrollGraph):
    """What ES and PES share: the perturbation scales, the checks, the diagnostics."""

    sigma: float = 0.01
    sigma_of: tuple[str, ...] = ()
    stochastic = True  # meta_gradient hands it the Noise its perturbations are drawn from
    reference = "smoothed"  # gradcheck: a z-score against the smoothed objective's paired exact gradients
    stat_names = ("es_loss_gap", "es_sq_norm")

    def __post_init__(self) -> None:
        if not (self.sigma > 0 and math.isfinite(self.sigma)):
            raise MethodError("es.sigma", self.sigma, "must be > 0 (the perturbations' standard deviation)")
        object.__setattr__(self, "sigma_of", tuple(self.sigma_of))
        for entry in self.sigma_of:
            prefix, _, value = str(entry).partition("=")
            try:
                scale = float(value)
            except ValueError:
                scale = math.nan
            if not prefix or not (scale > 0 and math.isfinite(scale)):
                raise MethodError("es.sigma_of", entry, "each entry is 'name-prefix=sigma' with sigma > 0 "
                                  "(e.g. 'inner.lr=0.3')")

    def scales(self, phi: Params) -> dict[str, float]:
        """sigma of every tensor of phi: the longest matching prefix in sigma_of, else sigma."""
        pairs = [str(entry).partition("=") for entry in self.sigma_of]
        found = {}
        for name in phi:
            matches = [(len(prefix), float(value)) for prefix, _, value in pairs if name.startswith(prefix)]
            found[name] = max(matches)[1] if matches else self.sigma
        return found

    def check(self, rule, steps: int) -> None:
        pass

    def exact(self, steps: int) -> bool:
        return False

    def _noise(self, phi: Params, tasks: Tasks, noise: Noise | None, step_weights) -> Noise:
        """The caller's noise (default_noise without one); a multi-step loss is refused."""
        refuse_step_weights(self, step_weights)
        return default_noise(tasks, next(iter(phi.values())).device) if noise is None else noise

    @staticmethod
    def _each(gaps: torch.Tensor, eps: Params, scales: dict[str, float]) -> Params:
        """(L+ - L-) eps / (2 sigma^2) of every pair ([pairs, *shape] per tensor of phi)."""
        return {name: _leading(gaps, value) * value / (2 * scales[name] ** 2) for name, value in eps.items()}


@dataclass(frozen=True)
class ES(_EvolutionStrategy):
    pairs: int = 8
    name = "es"
    setting_keys = {"sigma": "es.sigma", "sigma_of": "es.sigma_of", "pairs": "es.pairs"}

    def __post_init__(self) -> None:
        super().__post_init__()
        at_least("es.pairs", self.pairs, 1, integer=True)

    def particles(self, phi: Params, tasks: Tasks, noise: Noise) -> tuple[Params, torch.Tensor, float]:
        """What gradcheck's smoothed reference needs: every particle's perturbation, its task, and the
        weight of its exact gradient in the estimate's expectation (a task's mean over its particles)."""
        eps = self._perturbations(phi, noise)
        count = num_tasks(tasks)
        return ({name: torch.stack([e, -e], 1).flatten(0, 1) for name, e in eps.items()},
                torch.arange(count, device=noise.index.device).repeat_interleave(2 * self.pairs), 1 / (2 * self.pairs))

    def _perturbations(self, phi: Params, noise: Noise) -> Params:
        """eps of every pair, in the order (task, pair)."""
        pairs, scales = self.pairs, self.scales(phi)
        pair_index = (noise.index[:, None] * pairs + torch.arange(pairs, device=noise.index.device)).flatten()
        return {name: scales[name] * z for name, z in draws(phi, noise.key, pair_index).items()}

    def hypergradient(self, problem, phi: Params, tasks: Tasks, inner, step_weights=None,
                      noise: Noise | None = None) -> MetaGradient:
        noise = self._noise(phi, tasks, noise, step_weights)
        count, pairs = num_tasks(tasks), self.pairs
        scales = self.scales(phi)
        eps = self._perturbations(phi, noise)
        # Particles in the order (task, pair, +/-).
        particle_phi = {name: torch.stack([phi[name].detach() + e, phi[name].detach() - e], 1).flatten(0, 1)
                        for name, e in eps.items()}
        particles = tree_map(lambda leaf: leaf.repeat_interleave(2 * pairs, 0), tasks)
        weights, _, losses = perturbed_unroll(problem, particle_phi, particles, inner)
        plus, minus = losses.reshape(count, pairs, 2).unbind(-1)
        # Per pair (f+ - f-) eps / (2 sigma^2); a task's estimate is the mean over its pairs.
        per_task = {name: value.reshape(count, pairs, *value.shape[1:]).mean(1)
                    for name, value in self._each((plus - minus).flatten(), eps, scales).items()}
        grad_sum = {name: value.sum(0) for name, value in per_task.items()}
        stats = {"es_loss_gap": (plus - minus).abs().mean(1),
                 "es_sq_norm": sum((value.flatten(1) ** 2).sum(1) for value in per_task.values())}
        # The first pair's + particle stands for the task in the logs' after-adaptation metrics.
        adapted = {name: value.reshape(count, 2 * pairs, *value.shape[1:])[:, 0] for name, value in weights.items()}
        return MetaGradient(grad_sum, losses.reshape(count, 2 * pairs).mean(1), stats, detached(adapted))


@dataclass(frozen=True)
class PES(_EvolutionStrategy):
    # Noise-reuse ES (Li et al. 2023): a pair draws its perturbation once per life and runs every
    # truncation of it at phi +/- that eps, the estimate weighting by eps itself, not a growing sum.
    reuse_noise: bool = False
    name = "pes"
    setting_keys = {"sigma": "es.sigma", "sigma_of": "es.sigma_of", "reuse_noise": "es.reuse_noise"}
    run_group = 2  # runs 2p and 2p+1 are one antithetic pair: one process, one mini-batch stream, one counter
    persistent = True  # its perturbed unrolls are the runs' real steps, and it keeps a state per run

    def check_episodic(self) -> None:
        raise MethodError("inner.mode", self.name, "persistent ES keeps each particle's state from one outer step to "
                          "the next, and an episode starts every task again: run it online (online.runs: the "
                          "particles, online.unroll: the truncation, online.horizon), or use es over the episode")

    def _perturbations(self, phi: Params, noise: Noise) -> Params:
        """eps of every run: its pair's draw, + for the pair's first run, - for its second."""
        scales = self.scales(phi)
        sign = 1.0 - 2.0 * (noise.index % 2).to(next(iter(phi.values())).dtype)
        return {name: _leading(sign, z) * scales[name] * z for name, z in draws(phi, noise.key, noise.index // 2).items()}

    def particles(self, phi: Params, tasks: Tasks, noise: Noise) -> tuple[Params, torch.Tensor, float]:
        """gradcheck's smoothed reference for one truncation from runs whose accumulated perturbation is
        still zero (their first outer step): each run's exact gradient counts once (a pair's two make
        the expectation of its estimate, 2 grad f_sigma)."""
        return self._perturbations(phi, noise), torch.arange(num_tasks(tasks), device=noise.index.device), 1.0

    def carry_init(self, phi: Params, count: int) -> dict:
        """Each run's accumulated perturbation at its start: zero."""
        return {"perturbation": {name: value.detach().new_zeros((count, *value.shape)) for name, value in phi.items()}}

    def hypergradient(self, problem, phi: Params, tasks: Tasks, inner, step_weights=None,
                      noise: Noise | None = None) -> MetaGradient:
        if getattr(problem, "start_state", None) is None:  # an episode's tasks, not persistent runs
            self.check_episodic()
        noise = self._noise(phi, tasks, noise, step_weights)
        shapes_only = noise.index.device.type == "meta"  # a memory estimate's probe: no values to check
        if num_tasks(tasks) % 2 or not shapes_only and (bool((noise.index[0::2] % 2 != 0).any()) or bool(
                (noise.index[1::2] != noise.index[0::2] + 1).any())):
            raise MethodError("online.runs", num_tasks(tasks), "persistent ES takes its runs in antithetic pairs "
                              "(2p, 2p+1), both on one process")
        scales = self.scales(phi)
        eps = self._perturbations(phi, noise)
        # Runs given without a carry (gradcheck's, from another method's schedule) are at their start: xi = 0.
        carry = tasks.get("carry") or self.carry_init(phi, num_tasks(tasks))
        if self.reuse_noise:  # the life's one perturbation: drawn now where the run has none yet (its start)
            stored = carry["perturbation"]
            fresh = torch.stack([(value == 0).flatten(1).all(1) for value in stored.values()]).all(0)
            eps = {name: torch.where(_leading(fresh, stored[name]), eps[name], stored[name]) for name in phi}
            accumulated = eps
        else:
            accumulated = {name: carry["perturbation"][name] + eps[name] for name in phi}
        particle_phi = {name: phi[name].detach() + eps[name] for name in phi}
        weights, state, losses = perturbed_unroll(problem, particle_phi, tasks, inner)
        # The sum over runs of xi_m L_m / sigma^2, taken pair by pair as 2 (L+ - L-) xi+ / (2 sigma^2) (the
        # members' xi are exactly opposite), so that the losses cancel before they are weighted; the engine's
        # division by the N runs makes it the mean over the N/2 pairs of (L+ - L-) xi / (2 sigma^2).
        pair_gap = losses[0::2] - losses[1::2]
        per_pair = self._each(pair_gap, {name: value[0::2] for name, value in accumulated.items()}, scales)
        grad_sum = {name: 2 * value.sum(0) for name, value in per_pair.items()}
        sq_norm = sum((value.flatten(1) ** 2).sum(1) for value in per_pair.values())
        stats = {"es_loss_gap": pair_gap.abs().repeat_interleave(2), "es_sq_norm": sq_norm.repeat_interleave(2)}
        carried = {"weights": detached(weights), "state": state, "carry": {"perturbation": accumulated}}
        return MetaGradient(grad_sum, losses, stats, detached(weights), carried)
