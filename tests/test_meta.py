"""Every meta-gradient mode against an independent reference."""

import pytest
import torch
from torch.func import functional_call

from distmaml.meta import (adapt, detached, differentiated_steps, functional_forward, inner_loop, meta_gradient,
                           meta_gradient_loop, meta_loss)
from distmaml.models import MLP
from distmaml.tasks.rng import STREAM_TRAIN
from distmaml.tasks.sine import SineTasks, mse

LR = 0.05


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = MLP(1, [8, 8], 1).double()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    batch = SineTasks(seed=4, support=5, query=6, dtype=torch.float64).sample(STREAM_TRAIN, 0, torch.arange(4))
    return model, params, batch


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads.values()])


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_matches_finite_differences(setup, steps):
    model, params, batch = setup
    names, shapes = list(params), [p.shape for p in params.values()]
    sizes = [p.numel() for p in params.values()]

    def objective(theta_flat):
        theta = {n: t.view(s) for n, t, s in zip(names, theta_flat.split(sizes), shapes)}
        return meta_loss(model, theta, batch, LR, steps).sum()

    theta0 = flat(params).detach()
    engine = flat(meta_gradient(model, params, batch, LR, steps).grad_sum)
    eps = 1e-6
    numeric = torch.stack([(objective(theta0 + eps * e) - objective(theta0 - eps * e)) / (2 * eps)
                           for e in torch.eye(theta0.numel(), dtype=torch.float64)])
    assert torch.allclose(engine, numeric, rtol=1e-6, atol=1e-8)
    # ...and the second-order term matters here: first order gives a different answer.
    first = flat(meta_gradient(model, params, batch, LR, steps, "first_order").grad_sum)
    assert (first - numeric).abs().max() > 1e-4


@pytest.mark.parametrize("mode, steps, truncate", [
    ("second_order", 0, None), ("second_order", 1, None), ("second_order", 4, None),
    ("first_order", 1, None), ("first_order", 4, None),
    ("truncated", 4, 0), ("truncated", 4, 2), ("truncated", 4, 4),
])
def test_batched_engine_equals_per_task_loop(setup, mode, steps, truncate):
    model, params, batch = setup
    batched = meta_gradient(model, params, batch, LR, steps, mode, truncate)
    looped, losses = meta_gradient_loop(model, params, batch, LR, steps, mode, truncate)
    assert torch.allclose(flat(batched.grad_sum), flat(looped), rtol=1e-10, atol=1e-12)
    assert torch.allclose(batched.task_losses, losses, rtol=1e-12)
    assert batched.adapted["net.0.weight"].shape == (4, 8, 1)
    assert not any(a.requires_grad for a in batched.adapted.values())


def test_truncation_identities(setup):
    model, params, batch = setup
    second = flat(meta_gradient(model, params, batch, LR, 5, "second_order").grad_sum)
    first = flat(meta_gradient(model, params, batch, LR, 5, "first_order").grad_sum)
    assert torch.equal(flat(meta_gradient(model, params, batch, LR, 5, "truncated", 5).grad_sum), second)
    assert torch.equal(flat(meta_gradient(model, params, batch, LR, 5, "truncated", 0).grad_sum), first)
    middle = flat(meta_gradient(model, params, batch, LR, 5, "truncated", 2).grad_sum)
    assert (middle - second).abs().max() > 1e-6 and (middle - first).abs().max() > 1e-6


def test_first_order_is_query_gradient_at_adapted_weights(setup):
    """FOMAML by definition: sum over tasks of grad L_query evaluated at theta'."""
    model, params, batch = setup
    expected = torch.zeros_like(flat(params))
    for i in range(batch.num_tasks):
        task = batch.task(i)
        adapted = {k: v.detach().clone() for k, v in params.items()}
        for _ in range(3):  # plain SGD written out with torch.autograd on leaf tensors
            for v in adapted.values():
                v.requires_grad_()
            loss = mse(functional_call(model, adapted, (task.support_x,)), task.support_y)
            grads = torch.autograd.grad(loss, list(adapted.values()))
            adapted = {k: (v - LR * g).detach() for (k, v), g in zip(adapted.items(), grads)}
        for v in adapted.values():
            v.requires_grad_()
        query = mse(functional_call(model, adapted, (task.query_x,)), task.query_y)
        expected += flat(dict(zip(adapted, torch.autograd.grad(query, list(adapted.values())))))
    engine = flat(meta_gradient(model, params, batch, LR, 3, "first_order").grad_sum)
    assert torch.allclose(engine, expected, rtol=1e-10, atol=1e-12)


def test_zero_inner_steps_is_plain_gradient(setup):
    model, params, batch = setup
    loss = sum(mse(functional_forward(model, params, batch.query_x[i]), batch.query_y[i]) for i in range(4))
    expected = flat(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    assert torch.allclose(flat(meta_gradient(model, params, batch, LR, 0).grad_sum), expected, rtol=1e-12)


def test_inner_loop_is_sgd(setup):
    model, params, batch = setup
    task = batch.task(0)
    adapted = inner_loop(model, params, task.support_x, task.support_y, LR, 1)
    loss = mse(functional_forward(model, params, task.support_x), task.support_y)
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, value), grad in zip(params.items(), grads):
        assert torch.allclose(adapted[name], value - LR * grad)
    batched, is_batched = adapt(model, params, batch.support_x, batch.support_y, LR, 1)
    assert is_batched and torch.allclose(batched["net.0.bias"][0], adapted["net.0.bias"])
    assert detached(adapted)["net.0.bias"].requires_grad is False


def test_inner_steps_reduce_support_loss(setup):
    model, params, batch = setup
    task = batch.task(1)
    before = mse(functional_forward(model, params, task.support_x), task.support_y)
    adapted = inner_loop(model, params, task.support_x, task.support_y, LR, 10, "first_order")
    after = mse(functional_forward(model, adapted, task.support_x), task.support_y)
    assert after < before


def test_mode_errors():
    assert differentiated_steps("truncated", 5, 2) == 2
    with pytest.raises(ValueError, match="truncate"):
        differentiated_steps("truncated", 2, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        differentiated_steps("zeroth_order", 2)
