"""Implicit meta-gradients (iMAML: the maml problem with a proximal inner loss, ImplicitCG) held to
closed forms, to the unrolled limit, and to the per-task loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distmaml.meta import (MAML, ImplicitCG, Inner, SecondOrder, TaskBatch, make_method, make_rule, meta_gradient,
                           meta_gradient_loop)
from distmaml.models import MLP
from distmaml.rng import STREAM_EVAL, STREAM_TRAIN
from distmaml.tasks.sine import SineTasks

DTYPE = torch.float64


def implicit_inner(inner_lr: float, inner_steps: int, lam: float, *, cg_steps: int = 5, cg_damping: float = 0.0,
                   cg_tol: float = 0.0, inner_safeguard: bool = False) -> Inner:
    """iMAML's inner loop and solver. The damping is given as the relative d of the system
    ((1 + d) I + H / lam) g = grad L_q; ImplicitCG adds its damping to H + lam I itself, so it is lam d."""
    return Inner(make_rule("sgd", inner_lr), inner_steps,
                 ImplicitCG(damping=lam * cg_damping, safeguard=inner_safeguard, cg_steps=cg_steps, cg_tol=cg_tol))


def implicit_meta_gradient(model: nn.Module, params, batch: TaskBatch, inner_lr: float, inner_steps: int, *,
                           lam: float, **settings):
    return meta_gradient(MAML(model, proximal=lam), params, batch, implicit_inner(inner_lr, inner_steps, lam,
                                                                                   **settings))


def implicit_meta_gradient_loop(model: nn.Module, params, batch: TaskBatch, inner_lr: float, inner_steps: int, *,
                                lam: float, **settings):
    return meta_gradient_loop(MAML(model, proximal=lam), params, batch, implicit_inner(inner_lr, inner_steps, lam,
                                                                                        **settings))


def regularised_adapt(model: nn.Module, params, support_x: torch.Tensor, support_y: torch.Tensor, inner_lr: float,
                      inner_steps: int, lam: float, safeguard: bool = False):
    """Every task's inner weights after K (safeguarded) SGD steps on L_support + lam/2 |w - theta|^2,
    as the implicit method adapts them (the query set is not read)."""
    # Training refuses an implicit method at K = 0 (no solve to differentiate); adapting for 0 steps is a start.
    inner = implicit_inner(inner_lr, max(inner_steps, 1), lam, inner_safeguard=safeguard)
    tasks = TaskBatch(support_x, support_y, support_x, support_y)
    return inner.method.adapt(MAML(model, proximal=lam), params, tasks, inner, inner_steps).weights


def linear_regression_tasks(num_tasks: int, dim: int, support: int = 20, query: int = 15,
                            seed: int = 0) -> TaskBatch:
    """Tasks y = X w_task + noise whose features have unequal scales, so the Hessian is ill-conditioned
    enough that CG needs several steps."""
    generator = torch.Generator().manual_seed(seed)
    scales = torch.linspace(0.3, 2.0, dim, dtype=DTYPE)

    def points(count: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(num_tasks, count, dim, generator=generator, dtype=DTYPE) * scales
        w = torch.randn(num_tasks, dim, 1, generator=generator, dtype=DTYPE)
        return x, x @ w + 0.1 * torch.randn(num_tasks, count, 1, generator=generator, dtype=DTYPE)

    support_x, support_y = points(support)
    return TaskBatch(support_x, support_y, *points(query))


def linear_model(dim: int, seed: int = 1) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = nn.Linear(dim, 1, bias=False).to(DTYPE)
    return model, {name: value.detach().requires_grad_() for name, value in model.named_parameters()}


def closed_form(batch: TaskBatch, theta: torch.Tensor, lam: float, damping: float = 0.0):
    """Per task, with L(w) = 1/n |X w - y|^2 (MSE of a bias-free linear model):
    H = 2/n X^T X, grad L_s(w) = H w - b with b = 2/n X^T y, so the regularised optimality condition
    H phi - b + lam (phi - theta) = 0 gives phi* = (H + lam I)^-1 (b + lam theta), and the implicit
    meta-gradient is g = ((1 + damping) I + H / lam)^-1 grad L_q(phi*)."""
    phis, grads, hessians = [], [], []
    for i in range(batch.num_tasks):
        x, y, qx, qy = (t[i] for t in batch)
        hessian = 2.0 / x.shape[0] * x.T @ x
        eye = torch.eye(x.shape[1], dtype=DTYPE)
        phi = torch.linalg.solve(hessian + lam * eye, 2.0 / x.shape[0] * x.T @ y + lam * theta[:, None])
        query_grad = 2.0 / qx.shape[0] * qx.T @ (qx @ phi - qy)
        grads.append(torch.linalg.solve((1.0 + damping) * eye + hessian / lam, query_grad)[:, 0])
        phis.append(phi[:, 0])
        hessians.append(hessian)
    return torch.stack(phis), torch.stack(grads), torch.stack(hessians)


def contraction(hessians: torch.Tensor, lam: float, inner_lr: float) -> float:
    """max over tasks of |1 - lr (mu + lam)|: how much each inner step shrinks the distance to phi*."""
    eigenvalues = torch.linalg.eigvalsh(hessians)
    return (1 - inner_lr * (eigenvalues + lam)).abs().max().item()


@pytest.mark.parametrize("damping", [0.0, 0.5])
def test_inner_solution_and_meta_gradient_match_closed_form(damping):
    dim, lam = 5, 0.7
    batch = linear_regression_tasks(num_tasks=3, dim=dim)
    model, params = linear_model(dim)
    phi_star, g_star, hessians = closed_form(batch, params["weight"][0].detach(), lam, damping)
    eigenvalues = torch.linalg.eigvalsh(hessians)
    inner_lr = 2.0 / (eigenvalues.min().item() + eigenvalues.max().item() + 2 * lam)  # the fastest fixed step
    inner_steps = 300
    assert contraction(hessians, lam, inner_lr) ** inner_steps < 1e-14

    adapted = regularised_adapt(model, params, batch.support_x, batch.support_y, inner_lr, inner_steps, lam)
    torch.testing.assert_close(adapted["weight"][:, 0], phi_star, rtol=0, atol=1e-10)

    result = implicit_meta_gradient(model, params, batch, inner_lr, inner_steps, lam=lam, cg_steps=2 * dim,
                                    cg_damping=damping, cg_tol=0.0)
    torch.testing.assert_close(result.grad_sum["weight"][0], g_star.sum(0), rtol=0, atol=1e-6)
    assert (result.stats["cg_residual"] < 1e-8).all()
    assert (result.stats["inner_grad_norm"] < 1e-10).all()
    query_losses = ((batch.query_x @ phi_star[..., None] - batch.query_y) ** 2).mean((1, 2))
    torch.testing.assert_close(result.task_losses, query_losses, rtol=0, atol=1e-10)


def test_cg_error_falls_monotonically_with_cg_steps():
    # CG's Euclidean error |x_k - x*| decreases at every step (Hestenes and Stiefel 1952, Thm 6:3).
    # The exact solution is taken at the same phi_K the implementation reaches, so only CG is tested.
    dim, lam, inner_lr, inner_steps = 8, 0.3, 0.05, 10
    batch = linear_regression_tasks(num_tasks=2, dim=dim, seed=3)
    model, params = linear_model(dim)
    phi_k = regularised_adapt(model, params, batch.support_x, batch.support_y, inner_lr, inner_steps, lam)["weight"]
    n, m = batch.support_x.shape[1], batch.query_x.shape[1]
    hessians = 2.0 / n * batch.support_x.transpose(1, 2) @ batch.support_x
    query_grads = 2.0 / m * batch.query_x.transpose(1, 2) @ (batch.query_x @ phi_k.transpose(1, 2) - batch.query_y)
    exact = torch.linalg.solve(torch.eye(dim, dtype=DTYPE) + hessians / lam, query_grads)[..., 0].sum(0)
    errors = []
    for cg_steps in range(1, dim + 1):
        result = implicit_meta_gradient(model, params, batch, inner_lr, inner_steps, lam=lam, cg_steps=cg_steps,
                                        cg_tol=0.0)
        errors.append((result.grad_sum["weight"][0] - exact).norm().item())
    assert errors[0] > 1e-2 * exact.norm().item()  # one step is far off: the test needs several
    assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
    assert errors[-1] < 1e-9


def unrolled_meta_gradient(batch: TaskBatch, theta: torch.Tensor, lam: float, inner_lr: float,
                           inner_steps: int) -> torch.Tensor:
    """Sum over tasks of d L_q(phi_K) / d theta by plain autograd through K regularised SGD steps."""
    theta = theta.detach().requires_grad_()
    total = 0.0
    for i in range(batch.num_tasks):
        x, y, qx, qy = (t[i] for t in batch)
        phi = theta
        for _ in range(inner_steps):
            support_loss = ((x @ phi - y[:, 0]) ** 2).mean()
            (support_grad,) = torch.autograd.grad(support_loss, phi, create_graph=True)
            phi = phi - inner_lr * (support_grad + lam * (phi - theta))
        total = total + ((qx @ phi - qy[:, 0]) ** 2).mean()
    (meta_grad,) = torch.autograd.grad(total, theta)
    return meta_grad


def test_implicit_is_the_limit_of_the_unrolled_meta_gradient():
    # With H constant, phi_K = M phi_{K-1} + c with M = I - lr (H + lam I), so d phi_K / d theta =
    # M^K + lam (H + lam I)^-1 (I - M^K): the unrolled gradient minus the implicit one (both taken at
    # the same phi_K) is [H (H + lam I)^-1 M^K] grad L_q(phi_K), whose norm is at most
    # rho^K |grad L_q(phi_K)|, rho = |M|_2 the contraction factor. A slow step size makes that
    # bound visible at K = 20 (rho^20 ~ 0.1) and negligible (rho^200 ~ 1e-9) at K = 200.
    dim, lam = 5, 0.7
    batch = linear_regression_tasks(num_tasks=3, dim=dim, seed=5)
    model, params = linear_model(dim)
    theta = params["weight"][0]
    _, _, hessians = closed_form(batch, theta.detach(), lam)
    inner_lr = 1.0 / (torch.linalg.eigvalsh(hessians).max().item() + lam)
    rho = contraction(hessians, lam, inner_lr)
    assert 0.85 < rho < 0.95
    differences = {}
    for inner_steps in (20, 200):
        implicit = implicit_meta_gradient(model, params, batch, inner_lr, inner_steps, lam=lam, cg_steps=2 * dim)
        phi_k = regularised_adapt(model, params, batch.support_x, batch.support_y, inner_lr, inner_steps, lam)
        query_grads = 2.0 / batch.query_x.shape[1] * batch.query_x.transpose(1, 2) @ (
            batch.query_x @ phi_k["weight"].transpose(1, 2) - batch.query_y)
        bound = rho ** inner_steps * query_grads.norm(dim=(1, 2)).sum().item() + 1e-12
        unrolled = unrolled_meta_gradient(batch, theta, lam, inner_lr, inner_steps)
        # "Unrolled iMAML": the same problem under the second-order method is this hand-written unroll.
        engine = meta_gradient(MAML(model, proximal=lam), params, batch,
                               Inner(make_rule("sgd", inner_lr), inner_steps, SecondOrder()))
        torch.testing.assert_close(engine.grad_sum["weight"][0], unrolled, rtol=1e-10, atol=1e-12)
        differences[inner_steps] = (implicit.grad_sum["weight"][0] - unrolled).norm().item()
        assert differences[inner_steps] <= bound, (inner_steps, differences[inner_steps], bound)
    assert differences[200] < 1e-8 * unrolled.norm().item()
    assert differences[20] > 10 * differences[200]  # the comparison sees the convergence, not a coincidence


def sine_batch(num_tasks: int, stream: int = STREAM_TRAIN, iteration: int = 0) -> TaskBatch:
    return SineTasks(seed=0, dtype=DTYPE).sample(stream, iteration, torch.arange(num_tasks))


def sine_model(hidden=(40, 40), seed: int = 0) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(seed)
    model = MLP(1, hidden, 1).to(DTYPE)
    return model, {name: value.detach().requires_grad_() for name, value in model.named_parameters()}


def test_cg_stopping_each_task_on_its_own_matches_the_per_task_loop_on_sine():
    """Batched = per-task loop for the implicit methods, statistics included, is tests/meta/test_maml.py's;
    here what is CG's own: with a tolerance, tasks stop at different CG steps and are masked off
    one by one while the others go on, as the loop stops each task alone."""
    model, params = sine_model()
    batch = sine_batch(6)
    settings = dict(lam=2.0, cg_steps=6, cg_damping=0.1, cg_tol=1e-2)
    batched = implicit_meta_gradient(model, params, batch, 0.02, 5, **settings)
    loop = implicit_meta_gradient_loop(model, params, batch, 0.02, 5, **settings)
    assert torch.equal(batched.stats["cg_steps"], loop.stats["cg_steps"])
    assert len(set(batched.stats["cg_steps"].tolist())) > 1  # the per-task masking was exercised
    assert set(batched.stats) == set(loop.stats) == {"cg_residual", "cg_steps", "inner_grad_norm"}
    for key in ("cg_residual", "inner_grad_norm"):
        torch.testing.assert_close(batched.stats[key], loop.stats[key], rtol=1e-8, atol=1e-12)
    # The masked tasks' solutions, not only their step counts, are the loop's.
    for name in params:
        torch.testing.assert_close(batched.grad_sum[name], loop.grad_sum[name], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(batched.task_losses, loop.task_losses, rtol=1e-12, atol=0)


def test_implicit_approaches_unrolled_on_a_small_tanh_network():
    # Nonlinear check of the Hessian-vector products. Smooth activations, because a ReLU network's
    # regularised inner problem can settle on a kink where no gradient vanishes (the inner gradient
    # norm then stays ~0.1 however long SGD runs) and the implicit function theorem does not apply.
    # Here lam = 5 makes the inner problem contract fast: after K = 100 steps the inner gradient is
    # ~1e-9, so phi_K and the unrolled Jacobian sit at their fixed point to about that accuracy.
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)).to(DTYPE)
    params = {name: value.detach().requires_grad_() for name, value in model.named_parameters()}
    batch = sine_batch(2)
    lam, inner_lr, inner_steps = 5.0, 0.05, 100
    implicit = implicit_meta_gradient(model, params, batch, inner_lr, inner_steps, lam=lam, cg_steps=120)
    assert (implicit.stats["cg_residual"] < 1e-8).all()
    assert (implicit.stats["inner_grad_norm"] < 1e-7).all()
    names = list(params)
    total = 0.0
    for i in range(batch.num_tasks):
        task = batch.task(i)
        phi = dict(params)
        for _ in range(inner_steps):
            support_loss = nn.functional.mse_loss(torch.func.functional_call(model, phi, (task.support_x,)),
                                                  task.support_y)
            grads = torch.autograd.grad(support_loss, list(phi.values()), create_graph=True)
            phi = {n: phi[n] - inner_lr * (g + lam * (phi[n] - params[n])) for n, g in zip(names, grads)}
        total = total + nn.functional.mse_loss(torch.func.functional_call(model, phi, (task.query_x,)),
                                               task.query_y)
    unrolled = torch.autograd.grad(total, list(params.values()))
    flat_implicit = torch.cat([implicit.grad_sum[n].flatten() for n in names])
    flat_unrolled = torch.cat([g.flatten() for g in unrolled])
    assert (flat_implicit - flat_unrolled).norm() < 1e-6 * flat_unrolled.norm()


def test_meta_gradient_dispatches_to_the_implicit_method():
    model, params = sine_model()
    batch = sine_batch(4)
    problem = MAML(model, proximal=1.0)
    spec = Inner(make_rule("sgd", 0.01), 3, "implicit")
    assert spec.method == ImplicitCG(cg_steps=5, cg_tol=1e-10)  # a method named: its default settings
    # The config's settings reach the fields they name.
    assert make_method("implicit", damping=0.3, safeguard=True, cg_steps=7, cg_tol=1e-6) == \
        ImplicitCG(damping=0.3, safeguard=True, stop_early=True, cg_steps=7, cg_tol=1e-6)
    direct = spec.method.hypergradient(problem, params, batch, spec)
    dispatched = meta_gradient(problem, params, batch, spec)
    assert list(dispatched.grad_sum) == list(params)
    for name in params:
        assert torch.equal(direct.grad_sum[name], dispatched.grad_sum[name])
    assert dispatched.grad_sum["net.0.weight"].abs().sum() > 0
    assert torch.equal(direct.task_losses, dispatched.task_losses)
    for key in ("cg_residual", "cg_steps", "inner_grad_norm"):
        assert dispatched.stats[key].shape == (4,)
        assert torch.equal(direct.stats[key], dispatched.stats[key])


def test_implicit_inner_loop_keeps_no_graph_and_starts_at_theta():
    model, params = sine_model()
    batch = sine_batch(3)
    adapted = regularised_adapt(model, params, batch.support_x, batch.support_y, 0.01, 0, lam=1.0)
    for name, value in params.items():
        assert torch.equal(adapted[name], value.detach().expand_as(adapted[name]))
    adapted = regularised_adapt(model, params, batch.support_x, batch.support_y, 0.01, 4, lam=1.0)
    assert all(value.grad_fn is None and not value.requires_grad for value in adapted.values())
    assert not torch.equal(adapted["net.4.bias"][0], params["net.4.bias"].detach())


@pytest.mark.slow
def test_training_with_implicit_gradients_lowers_post_adaptation_loss():
    # configs/sine_imaml.yaml's inner and solver settings, in float32 (this test is about learning,
    # not digits). The damping keeps (1 + d) I + H/lam positive definite on this ReLU MLP, whose
    # support Hessian is indefinite; undamped, CG diverges and the loss hardly moves. With these
    # settings 200 iterations halve the loss, so asking for 0.75x leaves room for a change of the
    # task stream.
    torch.manual_seed(0)
    model = MLP(1, (40, 40), 1)
    params = {name: value.detach().requires_grad_() for name, value in model.named_parameters()}
    settings = dict(lam=5.0, cg_steps=5, cg_damping=3.0, cg_tol=1e-10)  # ImplicitCG's damping: 15
    inner_lr, inner_steps, meta_batch = 0.01, 10, 25
    tasks = SineTasks(seed=0)
    held_out = tasks.sample(STREAM_EVAL, 0, torch.arange(200))

    def post_adaptation_loss() -> float:
        return implicit_meta_gradient(model, params, held_out, inner_lr, inner_steps,
                                      **settings).task_losses.mean().item()

    before = post_adaptation_loss()
    optimizer = torch.optim.Adam(params.values(), lr=1e-3)
    residuals = []
    for iteration in range(200):
        batch = tasks.sample(STREAM_TRAIN, iteration, torch.arange(meta_batch))
        result = implicit_meta_gradient(model, params, batch, inner_lr, inner_steps, **settings)
        residuals.append(result.stats["cg_residual"].mean().item())
        for name, value in params.items():
            value.grad = result.grad_sum[name] / meta_batch
        optimizer.step()
    after = post_adaptation_loss()
    assert after < 0.75 * before, (before, after)
    assert sum(residuals) / len(residuals) < 0.1  # CG solved a positive definite system, not stopped early


def sharp_regression_tasks(num_tasks: int = 3, dim: int = 5, feature_scale: float = 6.0) -> TaskBatch:
    """linear_regression_tasks with features scaled up, so the support Hessian 2/n X^T X is sharp."""
    batch = linear_regression_tasks(num_tasks, dim, seed=7)
    return TaskBatch(batch.support_x * feature_scale, batch.support_y * feature_scale,
                     batch.query_x * feature_scale, batch.query_y * feature_scale)


def test_inner_safeguard_stops_a_sharp_task_diverging_and_keeps_the_solution():
    # inner_lr (lam + mu_max) = 3 > 2: the fixed-step inner loop blows up, as iMAML's did once
    # training sharpened the sine support loss. The safeguarded step (capped Cauchy step, steepest
    # descent with exact line search on a quadratic) converges to the same phi* and gives the same
    # closed-form meta-gradient.
    dim, lam, inner_steps = 5, 0.7 * 36, 300  # H and lam both 36x those of the closed-form test above
    batch = sharp_regression_tasks(dim=dim)
    model, params = linear_model(dim)
    phi_star, g_star, hessians = closed_form(batch, params["weight"][0].detach(), lam)
    top = torch.linalg.eigvalsh(hessians).max().item()
    inner_lr = 3.0 / (lam + top)
    assert contraction(hessians, lam, inner_lr) > 1.5

    plain = regularised_adapt(model, params, batch.support_x, batch.support_y, inner_lr, 40, lam)
    assert (plain["weight"][:, 0] - phi_star).norm() > 1e3 * phi_star.norm()
    guarded = regularised_adapt(model, params, batch.support_x, batch.support_y, inner_lr, inner_steps, lam,
                                safeguard=True)
    torch.testing.assert_close(guarded["weight"][:, 0], phi_star, rtol=0, atol=1e-10)

    result = implicit_meta_gradient(model, params, batch, inner_lr, inner_steps, lam=lam, cg_steps=2 * dim,
                                    inner_safeguard=True)
    torch.testing.assert_close(result.grad_sum["weight"][0], g_star.sum(0), rtol=1e-9, atol=1e-9)
    assert (result.stats["inner_grad_norm"] < 1e-9).all()
    loop = implicit_meta_gradient_loop(model, params, batch, inner_lr, inner_steps, lam=lam, cg_steps=2 * dim,
                                       inner_safeguard=True)
    torch.testing.assert_close(loop.grad_sum["weight"], result.grad_sum["weight"], rtol=1e-9, atol=1e-9)


def test_inner_safeguard_is_inactive_where_the_fixed_step_is_safe():
    # The Cauchy step is at least 1 / (lam + mu_max), so with inner_lr (lam + mu_max) <= 1 the cap
    # never binds and the safeguarded loop takes exactly the fixed steps.
    dim, lam = 5, 0.7
    batch = linear_regression_tasks(num_tasks=3, dim=dim)
    model, params = linear_model(dim)
    _, _, hessians = closed_form(batch, params["weight"][0].detach(), lam)
    inner_lr = 0.9 / (lam + torch.linalg.eigvalsh(hessians).max().item())
    plain = regularised_adapt(model, params, batch.support_x, batch.support_y, inner_lr, 7, lam)
    guarded = regularised_adapt(model, params, batch.support_x, batch.support_y, inner_lr, 7, lam, safeguard=True)
    torch.testing.assert_close(guarded["weight"], plain["weight"], rtol=1e-13, atol=1e-15)


def test_safeguarded_batched_matches_per_task_loop_on_sine():
    # inner_lr 0.05 against support Hessians with mu_max ~ 20-55 at init: the cap binds for some tasks.
    model, params = sine_model()
    batch = sine_batch(6)
    settings = dict(lam=2.0, cg_steps=6, cg_damping=0.1, cg_tol=0.0)
    batched = implicit_meta_gradient(model, params, batch, 0.05, 5, inner_safeguard=True, **settings)
    loop = implicit_meta_gradient_loop(model, params, batch, 0.05, 5, inner_safeguard=True, **settings)
    for name in params:
        torch.testing.assert_close(batched.grad_sum[name], loop.grad_sum[name], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(batched.task_losses, loop.task_losses, rtol=1e-12, atol=0)
    plain = implicit_meta_gradient(model, params, batch, 0.05, 5, **settings)
    assert not torch.allclose(plain.task_losses, batched.task_losses, rtol=1e-3)  # the safeguard acted
    assert torch.isfinite(batched.task_losses).all()
