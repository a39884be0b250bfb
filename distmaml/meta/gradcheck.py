"""Every hypergradient method against an independent reference, on a few tasks, in float64.

    report = gradcheck(problem, phi, tasks, inner, methods)     # {name: Check}

Two references, neither sharing code with the methods:

- finite_difference: central differences of the unrolled objective
  f(phi) = sum_tasks L_out(w_K(phi), phi), with w_K from the forward pass alone, along `directions`
  random unit directions (compared as directional derivatives). No single step suits every problem:
  too large and it straddles the kinks of a ReLU network's unroll, too small and rounding swamps a
  tiny hypergradient. So the differences are taken at steps 1e-3 ... 1e-6 and the adjacent pair that
  agrees best is used; their disagreement is the reference's own error, and an exact method must be
  within max(1e-6, 10 x that). The exact methods for it are second_order (and truncated with T = K).
- dense_ift: the implicit function theorem solved densely at the inner weights the method itself
  reached: v = (H + damping I)^-1 grad_w L_out with H the full inner Hessian (torch.func.jacrev of
  the inner gradient) and the mixed Jacobian d_phi grad_w L_in formed as a matrix. The implicit
  methods (CG, Neumann) must match it wherever their solver converged (its residual at most
  1e-6 on every task); where it did not, they are reported as approximate, with the residual. It
  needs the Hessian to fit: at most `max_dense` inner weights per task, else the implicit methods
  fall back to finite differences, where they are only approximate.

Approximate methods (first order, truncated T < K, finite difference, Reptile) are reported with
their error and never fail; an exact method above its reference's tolerance fails.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import torch
from torch.utils._pytree import tree_map
from torch.func import grad, jacrev

from distmaml.errors import SettingError
from distmaml.meta.functional import Params, Tasks, detached, num_tasks, task_at
from distmaml.meta.gradient import meta_gradient
from distmaml.meta.unrolling import task_values, unroll

TOLERANCE = {"finite_difference": 1e-6, "dense_ift": 1e-4}
Z_LIMIT = 4.0  # a stochastic method's largest |z| over the directions, against its smoothed reference
GROUPS = 16  # independent estimates (noise keys) a stochastic method's z-score is taken over


STEPS = (1e-3, 1e-4, 1e-5, 1e-6)


class Check(NamedTuple):
    rel_error: float | None  # None where the method does not apply (then `skipped` says why)
    reference: str
    exact: bool
    skipped: str | None = None
    reference_error: float = 0.0  # the finite-difference reference's own estimated relative error
    z: float | None = None  # a stochastic method: largest |z| over the directions against its smoothed reference
    particles: int = 0  # ... and the particles the estimate and the reference were averaged over

    @property
    def tolerance(self) -> float:
        if self.z is not None:
            return Z_LIMIT
        return max(TOLERANCE[self.reference], 10 * self.reference_error)

    @property
    def failed(self) -> bool:
        if self.z is not None:
            return self.skipped is None and not self.z <= Z_LIMIT
        error = math.inf if self.rel_error is None or not math.isfinite(self.rel_error) else self.rel_error
        return self.skipped is None and self.exact and error > self.tolerance


def _flat(params: Params) -> torch.Tensor:
    return torch.cat([value.reshape(-1) for value in params.values()])


def _unflat(vector: torch.Tensor, like: Params) -> Params:
    out, start = {}, 0
    for name, value in like.items():
        out[name] = vector[start:start + value.numel()].reshape(value.shape)
        start += value.numel()
    return out


def unrolled_value(problem: Any, phi: Params, tasks: Tasks, inner) -> torch.Tensor:
    """f(phi): the sum over tasks of the outer loss after the inner loop, forward pass only."""
    with torch.no_grad():
        weights = unroll(problem, phi, tasks, inner, differentiated=0).weights
        return task_values(problem.outer_loss, weights, phi, tasks).sum()


def finite_difference_directions(problem: Any, phi: Params, tasks: Tasks, inner, directions: torch.Tensor,
                                 steps: tuple[float, ...] = STEPS) -> tuple[torch.Tensor, float]:
    """Central differences of f along each row of `directions` ([D, size of phi]) at the step that
    agrees best with its neighbour; with their relative disagreement (the estimate's own error)."""
    base = detached(phi)
    flat = _flat(base)

    def central(step: float) -> torch.Tensor:
        out = []
        for direction in directions:
            plus = unrolled_value(problem, _unflat(flat + step * direction, base), tasks, inner)
            minus = unrolled_value(problem, _unflat(flat - step * direction, base), tasks, inner)
            out.append((plus - minus) / (2 * step))
        return torch.stack(out)

    estimates = [central(step) for step in steps]
    pairs = [((a - b).norm() / b.norm().clamp_min(torch.finfo(b.dtype).tiny), b) for a, b in zip(estimates,
                                                                                                  estimates[1:])]
    disagreement, best = min(pairs, key=lambda pair: float(pair[0]))
    return best, float(disagreement)


def dense_ift(problem: Any, phi: Params, weights: Params, tasks: Tasks, step: int, damping: float) -> Params:
    """Sum over tasks of grad_phi L_out - (d_phi grad_w L_in)^T (H + damping I)^-1 grad_w L_out, at
    each task's `weights` (task dimension first), with every matrix formed densely."""
    base = detached(phi)
    total = torch.zeros_like(_flat(base))
    for i in range(num_tasks(tasks)):
        task = task_at(tasks, i)
        w = detached({name: value[i] for name, value in weights.items()})

        def inner_grad(w_flat: torch.Tensor, phi_flat: torch.Tensor) -> torch.Tensor:
            at_phi = _unflat(phi_flat, base)
            return _flat(grad(lambda point: problem.inner_loss(point, at_phi, task, step))(_unflat(w_flat, w)))

        def outer(w_flat: torch.Tensor, phi_flat: torch.Tensor) -> torch.Tensor:
            return problem.outer_loss(_unflat(w_flat, w), _unflat(phi_flat, base), task)

        w_flat, phi_flat = _flat(w), _flat(base)
        hessian, mixed = jacrev(inner_grad, argnums=(0, 1))(w_flat, phi_flat)
        outer_w, outer_phi = jacrev(outer, argnums=(0, 1))(w_flat, phi_flat)
        eye = torch.eye(w_flat.numel(), dtype=w_flat.dtype, device=w_flat.device)
        v = torch.linalg.solve(hessian + damping * eye, outer_w)
        total = total + outer_phi - mixed.T @ v
    return _unflat(total, base)


def gradcheck(problem: Any, phi: Params, tasks: Tasks, inner, methods: dict[str, Any], directions: int = 4,
              max_dense: int = 2500, seed: int = 0) -> dict[str, Check]:
    """Each method's hypergradient (at `inner`'s rule and steps) against its reference; see the module doc."""
    size = sum(value.numel() for value in phi.values())
    first = next(iter(phi.values()))
    generator = torch.Generator().manual_seed(seed)
    basis = torch.randn(directions, size, generator=generator, dtype=first.dtype).to(first.device)
    basis = basis / basis.norm(dim=1, keepdim=True)
    numeric, numeric_error = finite_difference_directions(problem, phi, tasks, inner, basis)
    inner_size = sum(value.numel() for value in problem.inner_template().values())
    report = {}
    for name, method in methods.items():
        if method.reference == "smoothed":
            try:
                report[name] = smoothed_check(problem, phi, tasks, dataclasses.replace(inner, method=method), basis)
            except SettingError as err:
                report[name] = Check(None, "smoothed", False, str(err))
            continue
        reference = method.reference if method.reference != "dense_ift" or inner_size <= max_dense \
            else "finite_difference"
        try:
            checked = dataclasses.replace(inner, method=method)
            result = meta_gradient(problem, phi, tasks, checked)
        except SettingError as err:
            report[name] = Check(None, reference, False, str(err))
            continue
        got = _flat(detached(result.grad_sum))
        solved = getattr(method, "solved", None)  # an iterative solve: exact where it converged
        exact = (method.exact(inner.steps) and reference == method.reference
                 and (solved is None or solved(result.stats)))
        if reference == "dense_ift":
            weights = method.adapt(problem, phi, tasks, checked, inner.steps).weights
            try:
                expected = _flat(dense_ift(problem, phi, weights, tasks, max(inner.steps - 1, 0), method.damping))
            except torch.linalg.LinAlgError:  # e.g. a ReLU unit dead on every example: no implicit derivative
                report[name] = Check(None, reference, False, "the inner Hessian is singular where the inner loop "
                                     "ended: implicit differentiation is not defined there (add implicit.damping)")
                continue
            error = (got - expected).norm() / expected.norm().clamp_min(torch.finfo(expected.dtype).tiny)
        else:
            error = (basis @ got - numeric).norm() / numeric.norm().clamp_min(torch.finfo(numeric.dtype).tiny)
        report[name] = Check(float(error), reference, exact,
                             reference_error=numeric_error if reference == "finite_difference" else 0.0)
    return report


def smoothed_gradient(problem: Any, phi: Params, tasks: Tasks, inner, eps: Params, task_of: torch.Tensor,
                      weight: float) -> torch.Tensor:
    """weight * sum over particles of the exact gradient of their task's K-step objective at phi + eps
    (autograd through every step of the perturbed unroll), flat."""
    from distmaml.meta.methods.evolution import perturbed_unroll

    leaf = {name: value.detach().requires_grad_() for name, value in phi.items()}
    count = len(task_of)
    particle_phi = {name: leaf[name].expand(count, *leaf[name].shape) + eps[name] for name in leaf}
    particle_tasks = tree_map(lambda value: value.index_select(0, task_of), tasks)
    _, _, losses = perturbed_unroll(problem, particle_phi, particle_tasks, inner, exact=True)
    with torch.enable_grad():
        grads = torch.autograd.grad(weight * losses.sum(), list(leaf.values()), allow_unused=True)
    return torch.cat([(torch.zeros_like(value) if g is None else g).reshape(-1) for value, g in zip(leaf.values(), grads)])


def smoothed_check(problem: Any, phi: Params, tasks: Tasks, inner, basis: torch.Tensor, groups: int = GROUPS) -> Check:
    """A stochastic method against the exact gradients of its smoothed objective under the same
    perturbations (paired Monte Carlo), over `groups` independent noise keys: along each direction of
    `basis`, z = mean(estimate - reference) / its standard error; the largest |z| is reported."""
    from distmaml.meta.functional import Noise

    method = inner.method
    index = torch.arange(num_tasks(tasks), device=basis.device)
    differences, estimates, references, particles = [], [], [], 0
    for group in range(groups):
        noise = Noise(torch.tensor(group, dtype=torch.int64, device=basis.device), index)
        estimate = _flat(detached(meta_gradient(problem, phi, tasks, inner, noise=noise).grad_sum))
        eps, task_of, weight = method.particles(phi, tasks, noise)
        reference = smoothed_gradient(problem, phi, tasks, inner, eps, task_of, weight)
        differences.append(basis @ (estimate - reference))
        estimates.append(estimate), references.append(reference)
        particles += len(task_of)
    spread = torch.stack(differences)
    z = spread.mean(0) / (spread.std(0) / groups ** 0.5).clamp_min(torch.finfo(spread.dtype).tiny)
    mean_estimate, mean_reference = torch.stack(estimates).mean(0), torch.stack(references).mean(0)
    error = (mean_estimate - mean_reference).norm() / mean_reference.norm().clamp_min(torch.finfo(spread.dtype).tiny)
    return Check(float(error), "smoothed", True, z=float(z.abs().max()), particles=particles)


def format_report(report: dict[str, Check]) -> str:
    """The report as a Markdown table."""
    lines = ["| method | reference | relative error | tolerance | exact | verdict |", "|---|---|---|---|---|---|"]
    for name, check in report.items():
        if check.skipped is not None:
            lines.append(f"| {name} | - | - | - | - | n/a: {check.skipped} |")
            continue
        verdict = "FAIL" if check.failed else ("ok" if check.exact else "approximate")
        error = f"{check.rel_error:.2e}" if math.isfinite(check.rel_error) else "not finite"
        if check.z is not None:  # a stochastic method: its z-score is the verdict, the error only informs
            lines.append(f"| {name} | smoothed ({check.particles} particles) | {error} | |z| = {check.z:.2f} <= "
                         f"{Z_LIMIT:g} | statistically | {verdict} |")
            continue
        lines.append(f"| {name} | {check.reference} | {error} | {check.tolerance:.0e} | "
                     f"{'yes' if check.exact else 'no'} | {verdict} |")
    return "\n".join(lines)
