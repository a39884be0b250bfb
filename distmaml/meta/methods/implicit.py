"""Implicit hypergradients: differentiate the inner problem's solution, not the path to it.

At a solution w* of the inner problem, grad_w L_in(w*, phi) = 0. The implicit function theorem
gives dw*/dphi = -A^-1 d_phi grad_w L_in with A = grad^2_w L_in, so

    v = A^-1 grad_w L_out(w*, phi)
    d L_out(w*(phi), phi) / d phi = grad_phi L_out - (d_phi grad_w L_in)^T v

evaluated at w_K, the end of K inner steps that keep no graph: memory does not grow with K. Both
products come from one retained double-backward graph of the batched inner gradient
(distmaml.meta.hessian), so every task gets its own H_i p_i from one backward pass. The linear
system is solved by the method's `solve`, a value: conjugate gradient (`CG`) or a truncated Neumann
series (`NeumannSeries`); `damping` adds to A's diagonal.

iMAML (Rajeswaran et al. 2019) is the MAML problem with a proximal inner loss
L_support(w) + lam/2 ||w - phi||^2: then A = H + lam I and d_phi grad_w L_in = -lam I, so the
hypergradient is lam (H + lam I)^-1 grad L_query = (I + H / lam)^-1 grad L_query. Learned
hyperparameters that enter the inner loss (a weight decay, per-example weights) use the same
formula unchanged.

What the formula cannot see: anything that acts on the path only (learned step sizes, where the
inner loop starts): such a rule or problem is refused in one line. `safeguard` caps each plain SGD
step of the inner solve at its Cauchy step, so a sharp task cannot make the inner loop diverge;
the solution, and so the hypergradient formula, is unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Protocol

import torch
from torch.utils._pytree import tree_map

from distmaml.meta.functional import MetaGradient, Params, Tasks, detached
from distmaml.meta.hessian import inner_hessian, per_task, task_dot, top_eigenvalue
from distmaml.meta.methods.base import MethodError, WithoutUnrollGraph, at_least, plain_adapt, refuse_step_weights
from distmaml.meta.rules import LEARNED
from distmaml.meta.unrolling import Unrolled, start_weights, task_values


def safeguarded_descent(problem: Any, phi: Params, tasks: Tasks, lr: float, steps: int,
                        trajectory: bool | Collection[int] = False) -> Unrolled:
    """K plain SGD steps on every task's inner loss, each capped at the task's Cauchy step.

    Why: a fixed step diverges once lr * (largest curvature) > 2, and nothing in an implicit
    hypergradient stops meta-training from sharpening the inner loss until it does (on sine within
    the first thousand iterations: docs/results.md). The step is min(lr, alpha_i) with
    alpha_i = g.g / g.A g the exact line minimiser of the local quadratic model along -g (one
    Hessian-vector product per task); alpha_i >= 1 / mu_max, so the cap is inactive wherever the
    fixed step is already safe (lr * mu_max <= 1), and on a quadratic every step descends. Where the
    curvature along g is not positive the step is lr. Vectorised over tasks (no host sync).
    """
    weights = {name: value.detach().clone() for name, value in start_weights(problem, detached(phi), tasks).items()}
    visited = []
    for step in range(steps):
        grads, hvp, _ = inner_hessian(problem, weights, phi, tasks, step, mixed=False)
        squared = task_dot(grads, grads)
        curvature = task_dot(grads, hvp(grads))
        positive = curvature > 0
        cauchy = squared / torch.where(positive, curvature, torch.ones_like(curvature))
        size = torch.where(positive, cauchy.clamp(max=lr), torch.full_like(cauchy, lr)).detach()
        weights = {name: (weights[name] - per_task(size, weights[name]) * grads[name]).detach() for name in weights}
        if trajectory is True or (not isinstance(trajectory, bool) and step + 1 in trajectory):
            visited.append(weights)
    return Unrolled(weights, {}, visited)


def batched_cg(matvec, rhs: Params, cg_steps: int, cg_tol: float,
               stop_early: bool = True) -> tuple[Params, torch.Tensor, torch.Tensor]:
    """Solve A_i x_i = rhs_i for every task i at once by conjugate gradient from x = 0.

    vmap cannot exit early for one task, so every task runs in lock step and a task's update is
    masked off once it stops: when its squared residual r.r is at or below `cg_tol`, or when its
    curvature p.Ap is not positive (A_i is not positive definite along p, so CG's step is
    meaningless: it keeps its last iterate, as truncated-Newton methods do). With `stop_early` the
    loop ends as soon as every task has stopped, which costs one host sync per step (pass False
    under CUDA graph capture). Returns (x, relative residual |r| / |rhs| per task, CG steps taken
    per task). The residual is CG's recursive one, which matches the true one in exact arithmetic.
    """
    x = {name: torch.zeros_like(value) for name, value in rhs.items()}
    r = dict(rhs)
    p = dict(rhs)
    rr = task_dot(r, r)
    rhs_norm = rr.sqrt()
    running = rr > cg_tol
    steps_taken = torch.zeros_like(rr, dtype=torch.long)
    for _ in range(cg_steps):
        # Shape-only (meta) tensors hold no residual to read: every step runs, an upper bound.
        if stop_early and running.device.type != "meta" and not bool(running.any()):
            break
        Ap = matvec(p)
        pAp = task_dot(p, Ap)
        running = running & (pAp > 0)
        alpha = torch.where(running, rr / torch.where(running, pAp, torch.ones_like(pAp)), torch.zeros_like(rr))
        x = {name: x[name] + per_task(alpha, x[name]) * p[name] for name in x}
        r = {name: r[name] - per_task(alpha, r[name]) * Ap[name] for name in r}
        rr_next = task_dot(r, r)
        beta = torch.where(running, rr_next / torch.where(running, rr, torch.ones_like(rr)), torch.zeros_like(rr))
        p = {name: torch.where(per_task(running, p[name]), r[name] + per_task(beta, p[name]) * p[name], p[name])
             for name in p}
        steps_taken = steps_taken + running.long()
        rr = rr_next
        running = running & (rr > cg_tol)
    return x, _relative(rr.sqrt(), rhs_norm), steps_taken


def neumann_series(matvec, rhs: Params, terms: int, alpha: float) -> tuple[Params, torch.Tensor]:
    """x = alpha * sum_{j=0..terms} (I - alpha A)^j rhs for every task: A^-1 rhs when alpha * |A| < 2.

    Returns (x, growth per task: |last term| / |rhs|). The series converges only while every
    eigenvalue of A lies in (0, 2 / alpha); a growth above 1 says it is diverging.
    """
    term, total = dict(rhs), dict(rhs)
    for _ in range(terms):
        product = matvec(term)
        term = {name: term[name] - alpha * product[name] for name in term}
        total = {name: total[name] + term[name] for name in total}
    growth = _relative(task_dot(term, term).sqrt(), task_dot(rhs, rhs).sqrt())
    return {name: alpha * value for name, value in total.items()}, growth


def _relative(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    positive = denominator > 0
    return torch.where(positive, numerator / torch.where(positive, denominator, torch.ones_like(denominator)),
                       torch.zeros_like(numerator))


class Solver(Protocol):
    """A linear solver for the implicit method, TorchOpt's `linear_solve` in shape: x, stats = solve(matvec, rhs)
    solves A_i x_i = rhs_i for every task at once, A given by `matvec`. It names the method it makes
    (`name`, the inner.mode users type) and its diagnostics (`stat_names`, one value per task in
    stats). Optional: solved(stats, tolerance), zero_cause(stats), divergence_cause(stats), and
    check_problem(problem, phi, task, damping) to refuse a problem before training."""

    name: str
    stat_names: tuple[str, ...]

    def __call__(self, matvec: Callable[[Params], Params], rhs: Params) -> tuple[Params, dict[str, torch.Tensor]]: ...


@dataclass(frozen=True)
class CG:
    """x by conjugate gradient: `cg_steps` iterations, or fewer once r.r <= `cg_tol` (every task).
    `stop_early` allows the host sync that ends the loop once every task has stopped (not under
    CUDA graph capture: the trainer sets it from engine.cuda_graph)."""

    cg_steps: int = 5
    cg_tol: float = 1e-10
    stop_early: bool = True
    name = "implicit"
    stat_names = ("cg_residual", "cg_steps")
    setting_keys = {"cg_steps": "implicit.cg_steps", "cg_tol": "implicit.cg_tol", "stop_early": None}

    def __post_init__(self) -> None:
        at_least("implicit.cg_steps", self.cg_steps, 1, integer=True)
        at_least("implicit.cg_tol", self.cg_tol, 0)

    def __call__(self, matvec, rhs: Params) -> tuple[Params, dict[str, torch.Tensor]]:
        solution, residual, taken = batched_cg(matvec, rhs, self.cg_steps, self.cg_tol, self.stop_early)
        return solution, {"cg_residual": residual.detach(), "cg_steps": taken}

    def solved(self, stats: dict[str, torch.Tensor], tolerance: float = 1e-6) -> bool:
        """Whether CG reached its solution on every task (relative residual at most `tolerance`)."""
        return bool((stats["cg_residual"] <= tolerance).all())

    def zero_cause(self, stats: dict[str, torch.Tensor]) -> str | None:
        """Why the hypergradient came out exactly 0, where CG can tell: it stopped before its first step
        on every task, the inner Hessian having no positive curvature along the outer gradient there."""
        steps, residual = stats.get("cg_steps"), stats.get("cg_residual")
        # A zero right-hand side also takes no step, and leaves no residual: that zero is the outer loss's.
        if steps is None or steps.numel() == 0 or bool((steps > 0).any()) or not bool((residual > 0).all()):
            return None
        return ("conjugate gradient found no positive curvature along the outer gradient on any task and took no "
                "step (the inner loop ended far from a minimum): give more inner.steps, or implicit.damping > 0")


@dataclass(frozen=True)
class NeumannSeries:
    """x by the truncated Neumann series alpha sum_j (I - alpha A)^j b (Lorraine et al. 2020).

    It converges when every eigenvalue of A lies in (0, 2 / alpha). Before training, the largest
    eigenvalue at the first task's start is estimated and a diverging alpha is refused; during
    training the `neumann_growth` statistic (|last term| / |b|, above 1 when diverging) and the
    residual |A x - b| / |b| are logged.
    """

    terms: int = 20
    alpha: float = 0.1
    name = "neumann"
    stat_names = ("neumann_residual", "neumann_growth")
    setting_keys = {"terms": "neumann.terms", "alpha": "neumann.alpha"}

    def __post_init__(self) -> None:
        at_least("neumann.terms", self.terms, 1, integer=True)
        if not (self.alpha > 0 and math.isfinite(self.alpha)):
            raise MethodError("neumann.alpha", self.alpha, "must be > 0")

    def __call__(self, matvec, rhs: Params) -> tuple[Params, dict[str, torch.Tensor]]:
        solution, growth = neumann_series(matvec, rhs, self.terms, self.alpha)
        product = matvec(solution)
        error = {name: product[name] - rhs[name] for name in rhs}
        residual = _relative(task_dot(error, error).sqrt(), task_dot(rhs, rhs).sqrt())
        return solution, {"neumann_residual": residual.detach(), "neumann_growth": growth.detach()}

    def check_problem(self, problem, phi: Params, task, damping: float) -> None:
        """Refuse an alpha the series diverges at, by the largest eigenvalue at the first task's start."""
        if any(value.device.type == "meta" for value in phi.values()):
            return  # shapes only: no eigenvalue to estimate
        largest = float(top_eigenvalue(problem, phi, _unsqueezed(task)).abs().max()) + damping
        if self.alpha * largest >= 2:
            raise MethodError("neumann.alpha", self.alpha, f"the Neumann series diverges: the inner Hessian's largest "
                              f"eigenvalue at the first task's start is about {largest:.4g} (damping included), and "
                              f"alpha times it must stay below 2; use neumann.alpha < {2 / largest:.3g}")

    def solved(self, stats: dict[str, torch.Tensor], tolerance: float = 1e-6) -> bool:
        """Whether the series reached the solution on every task (relative residual at most `tolerance`)."""
        return bool((stats["neumann_residual"] <= tolerance).all())

    def divergence_cause(self, stats: dict[str, torch.Tensor]) -> str | None:
        """What to change when a run diverged while the series' terms grew (growth above 1 on a task)."""
        growth = stats.get("neumann_growth")
        if growth is None or not bool(((growth > 1) | ~torch.isfinite(growth)).any()):
            return None
        worst = float(growth.nan_to_num(math.inf).max())
        return (f"the Neumann series diverged (its last term {worst:.3g} times its first, above 1), so neumann.alpha = "
                f"{self.alpha:g} is too large for the inner Hessian the run reached: use a smaller neumann.alpha")


@dataclass(frozen=True)
class Implicit(WithoutUnrollGraph):
    """The implicit hypergradient with the linear solve `solve` (CG or NeumannSeries, or your own Solver).

    The settings every solve shares live here: `damping` (implicit.damping) is added to A's diagonal,
    and `safeguard` (implicit.inner_safeguard) caps the plain SGD inner steps (safeguarded_descent).
    The solver owns its own (implicit.cg_steps, implicit.cg_tol; neumann.terms, neumann.alpha), and
    gives the method its name (the inner.mode users type), its statistics and its diagnoses.
    """

    solve: Solver = field(default_factory=CG)
    damping: float = 0.0
    safeguard: bool = True
    setting_keys = {"damping": "implicit.damping", "safeguard": "implicit.inner_safeguard"}
    reference = "dense_ift"

    def __post_init__(self) -> None:
        if not (self.damping >= 0 and math.isfinite(self.damping)):
            raise MethodError("implicit.damping", self.damping, "must be >= 0")

    @property
    def name(self) -> str:
        return self.solve.name

    @property
    def stat_names(self) -> tuple[str, ...]:
        return (*self.solve.stat_names, "inner_grad_norm")

    def exact(self, steps: int) -> bool:
        return True

    def solved(self, stats: dict[str, torch.Tensor], tolerance: float = 1e-6) -> bool:
        """Whether the solve reached its solution on every task (a solver that cannot tell: True)."""
        solved = getattr(self.solve, "solved", None)
        return True if solved is None else solved(stats, tolerance)

    def zero_cause(self, stats: dict[str, torch.Tensor]) -> str | None:
        cause = getattr(self.solve, "zero_cause", None)
        return None if cause is None else cause(stats)

    def divergence_cause(self, stats: dict[str, torch.Tensor]) -> str | None:
        cause = getattr(self.solve, "divergence_cause", None)
        return None if cause is None else cause(stats)

    def check(self, rule, steps: int) -> None:
        if steps < 1:
            # With no inner step the weights are where they started, not at a solution of the inner
            # problem, and nothing depends on phi through them: the implicit formula would answer anyway.
            raise MethodError("inner.steps", steps, f"{self.name} differentiates the solution the inner steps reach; "
                              "with none, the inner weights are their start, where the formula does not hold: give "
                              "inner.steps >= 1")
        if rule.learns:
            raise MethodError("inner.rule", rule.name, f"{self.name} differentiates the solution of the inner "
                              "problem, which does not depend on learned step sizes: they would get no gradient")
        if self.safeguard and rule.name != "sgd":
            raise MethodError("implicit.inner_safeguard", True, f"caps plain SGD steps; with inner.rule = "
                              f"{rule.name} set implicit.inner_safeguard=false")

    def check_online(self) -> None:
        """Online a run's real steps are the rule's own (distmaml.meta.online): the safeguard would cap the
        lookahead alone, and the steps differentiated would not be the steps taken."""
        if self.safeguard:
            raise MethodError("implicit.inner_safeguard", True, "caps the lookahead's steps only: online, a run's "
                              "real steps are the rule's own; set implicit.inner_safeguard=false")

    def check_problem(self, problem, phi: Params, task, inner) -> None:
        """The inner loss must have second derivatives in w and depend on phi (else so does not its
        solution); then the solver's own check, if it has one."""
        weights = {name: value.detach().clone().requires_grad_() for name, value in problem.start(phi, task).items()}
        meta = {name: value.detach().requires_grad_(value.is_floating_point()) for name, value in phi.items()}
        with torch.enable_grad():
            loss = problem.inner_loss(weights, meta, task, 0)
            grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True, allow_unused=True)
            grads = [g for g in grads if g is not None and g.requires_grad]
            ones = [torch.ones_like(g) for g in grads]
            second = torch.autograd.grad(grads, list(weights.values()), ones, allow_unused=True,
                                         retain_graph=True) if grads else []
        kind = type(problem).__name__
        if all(s is None for s in second):
            raise MethodError("inner.mode", self.name, f"needs an inner loss with second derivatives in the weights, "
                              f"and {kind}'s is linear in them or not twice differentiable")
        mixed = torch.autograd.grad(grads, list(meta.values()), ones, allow_unused=True)
        if not any(m is not None for name, m in zip(meta, mixed) if not name.startswith(LEARNED)):
            hint = getattr(problem, "implicit_hint", "")
            raise MethodError("inner.mode", self.name, f"differentiates the solution of the inner problem, and "
                              f"{kind}'s inner loss does not depend on phi, so neither does its solution"
                              + (f": {hint}" if hint else ""))
        solver_check = getattr(self.solve, "check_problem", None)
        if solver_check is not None:
            solver_check(problem, phi, task, self.damping)

    def hypergradient(self, problem, phi: Params, tasks: Tasks, inner, step_weights=None) -> MetaGradient:
        refuse_step_weights(self, step_weights)
        weights = detached(self.adapt(problem, phi, tasks, inner, inner.steps).weights)
        points = {name: value.requires_grad_() for name, value in detached(weights).items()}
        meta = {name: value.detach().requires_grad_(value.is_floating_point()) for name, value in phi.items()}
        with torch.enable_grad():
            outer = task_values(problem.outer_loss, points, meta, tasks)
            found = torch.autograd.grad(outer.sum(), [*points.values(), *meta.values()], allow_unused=True)
        wrt = [*points.values(), *meta.values()]
        found = [torch.zeros_like(x) if g is None else g for x, g in zip(wrt, found)]
        rhs = dict(zip(points, found[:len(points)]))  # grad_w L_out, per task
        direct = dict(zip(meta, found[len(points):]))  # grad_phi L_out, summed over tasks
        hessian = inner_hessian(problem, weights, phi, tasks, max(inner.steps - 1, 0))

        def matvec(p: Params) -> Params:
            products = hessian.hvp(p)
            return {name: products[name] + self.damping * p[name] for name in p}

        solution, stats = self.solve(matvec, rhs)
        mixed = hessian.mixed(solution)
        grad_sum = {name: (direct[name] - mixed[name]).detach() for name in phi}
        stats["inner_grad_norm"] = task_dot(hessian.grads, hessian.grads).sqrt()
        return MetaGradient(grad_sum, outer.detach(), stats, weights)

    def adapt(self, problem, phi, tasks, inner, steps, trajectory=False) -> Unrolled:
        if self.safeguard:
            return safeguarded_descent(problem, phi, tasks, inner.rule.lr, steps, trajectory)
        return plain_adapt(problem, phi, tasks, inner, steps, trajectory)


def ImplicitCG(*, damping: float = 0.0, safeguard: bool = True, stop_early: bool = True, cg_steps: int = 5,
               cg_tol: float = 1e-10) -> Implicit:
    """Implicit(CG(cg_steps, cg_tol, stop_early), damping, safeguard): inner.mode = implicit, by its earlier name."""
    return Implicit(CG(cg_steps, cg_tol, stop_early), damping, safeguard)


def Neumann(*, damping: float = 0.0, safeguard: bool = True, terms: int = 20, alpha: float = 0.1) -> Implicit:
    """Implicit(NeumannSeries(terms, alpha), damping, safeguard): inner.mode = neumann, by its earlier name."""
    return Implicit(NeumannSeries(terms, alpha), damping, safeguard)


def _unsqueezed(task: Any) -> Any:
    return tree_map(lambda leaf: leaf.unsqueeze(0) if torch.is_tensor(leaf) else leaf, task)
