"""Every meta-gradient mode and inner rule against an independent reference."""

import pytest
import torch
from torch.func import functional_call

from distmaml.engine import multi_step_weights
from distmaml.meta import (LEARNED, RULES, Inner, adapt, detached, differentiated_steps, functional_forward, inner_loop,
                           make_rule, meta_gradient, meta_gradient_loop, meta_loss, mse, reference_adapt, split)
from distmaml.models import MLP
from distmaml.tasks.rng import STREAM_TRAIN
from distmaml.tasks.sine import SineTasks

LR = 0.05
SETTINGS = {"sgd": {}, "meta_sgd": {}, "lslr": {}, "momentum": {"momentum": 0.8}, "adam": {"betas": (0.8, 0.9)}}


@pytest.fixture
def setup():
    torch.manual_seed(0)
    model = MLP(1, [8, 8], 1).double()
    params = {k: v.detach().clone().requires_grad_() for k, v in model.named_parameters()}
    batch = SineTasks(seed=4, support=5, query=6, dtype=torch.float64).sample(STREAM_TRAIN, 0, torch.arange(4))
    return model, params, batch


def inner(rule="sgd", steps=1, mode="second_order", truncate=None, **kwargs):
    lr = 0.02 if rule == "adam" else LR
    return Inner(make_rule(rule, lr, steps, **SETTINGS[rule]), steps, mse, mode, truncate, **kwargs)


def with_learned(params, spec):
    """theta: the weights and the rule's learned step sizes, jittered so that each one matters."""
    generator = torch.Generator().manual_seed(1)
    learned = {name: (value * (1 + 0.3 * torch.rand(value.shape, generator=generator, dtype=value.dtype)))
               .requires_grad_() for name, value in spec.rule.parameters(split(detached(params), spec.adapt)[0]).items()}
    return {**params, **learned}


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads.values()])


def finite_differences(objective, theta, names, eps=1e-6):
    """Central differences of objective(theta) in every element of theta[names]."""
    out = []
    for name in names:
        value = theta[name].detach()
        for index in range(value.numel()):
            bump = torch.zeros_like(value).reshape(-1)
            bump[index] = eps
            plus = {**theta, name: value + bump.view_as(value)}
            minus = {**theta, name: value - bump.view_as(value)}
            out.append((objective(plus) - objective(minus)) / (2 * eps))
    return torch.stack(out)


@pytest.mark.parametrize("steps", [1, 3])
def test_second_order_matches_finite_differences(setup, steps):
    model, params, batch = setup
    spec = inner(steps=steps)
    engine = flat(meta_gradient(model, params, batch, spec).grad_sum)
    numeric = finite_differences(lambda t: meta_loss(model, t, batch, spec)[0].sum().detach(), params, list(params))
    assert torch.allclose(engine, numeric, rtol=1e-6, atol=1e-8)
    # ...and the second-order term matters here: first order gives a different answer.
    first = flat(meta_gradient(model, params, batch, inner(steps=steps, mode="first_order")).grad_sum)
    assert (first - numeric).abs().max() > 1e-4


@pytest.mark.parametrize("rule, wrt", [("meta_sgd", "learned"), ("lslr", "learned"), ("momentum", "weights"),
                                       ("adam", "weights"), ("meta_sgd", "weights")])
def test_rules_meta_gradients_match_finite_differences(setup, rule, wrt):
    model, params, batch = setup
    spec = inner(rule, steps=3)
    theta = with_learned(params, spec)
    names = [n for n in theta if n.startswith(LEARNED) == (wrt == "learned")]
    if wrt == "weights":
        names = names[:2]  # the first layer's weight and bias: enough elements, a fraction of the time
    result = meta_gradient(model, theta, batch, spec)
    engine = torch.cat([result.grad_sum[name].reshape(-1) for name in names])
    numeric = finite_differences(lambda t: meta_loss(model, t, batch, spec)[0].sum().detach(), theta, names)
    torch.testing.assert_close(engine, numeric, rtol=1e-6, atol=1e-8)
    assert engine.abs().max() > 1e-3


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("mode, steps, truncate", [
    ("second_order", 3, None), ("first_order", 3, None), ("truncated", 3, 2), ("second_order", 0, None),
])
def test_batched_engine_equals_the_per_task_reference_for_every_rule(setup, rule, mode, steps, truncate):
    """The reference writes each rule out again from its settings: no code in common but the model."""
    model, params, batch = setup
    spec = inner(rule, steps, mode, truncate)
    theta = with_learned(params, spec)
    batched = meta_gradient(model, theta, batch, spec)
    looped = meta_gradient_loop(model, theta, batch, spec)
    torch.testing.assert_close(flat(batched.grad_sum), flat(looped.grad_sum), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(batched.task_losses, looped.task_losses, rtol=1e-12, atol=0)
    assert list(batched.grad_sum) == list(theta)
    assert batched.adapted["net.0.weight"].shape == (4, 8, 1)
    assert not any(a.requires_grad for a in batched.adapted.values())


@pytest.mark.parametrize("rule", RULES)
def test_checkpointed_unroll_gives_the_stored_graph_gradient_bit_for_bit_for_every_rule(setup, rule):
    """Learned step sizes, momentum buffers and Adam moments are inputs of the recomputed segments:
    none of their gradient may be dropped."""
    model, params, batch = setup
    stored_spec = inner(rule, 5, "truncated", 4)
    theta = with_learned(params, stored_spec)
    stored = meta_gradient(model, theta, batch, stored_spec)
    for checkpoint, segment in (("every_step", None), ("segments", 3), ("auto", None)):
        spec = inner(rule, 5, "truncated", 4, checkpoint=checkpoint, checkpoint_segment=segment)
        recomputed = meta_gradient(model, theta, batch, spec)
        for name in theta:
            assert torch.equal(stored.grad_sum[name], recomputed.grad_sum[name]), (checkpoint, name)
    if rule in ("meta_sgd", "lslr"):
        assert all(stored.grad_sum[name].abs().max() > 0 for name in theta if name.startswith(LEARNED))


def test_truncation_identities(setup):
    model, params, batch = setup
    second = flat(meta_gradient(model, params, batch, inner(steps=5)).grad_sum)
    first = flat(meta_gradient(model, params, batch, inner(steps=5, mode="first_order")).grad_sum)
    assert torch.equal(flat(meta_gradient(model, params, batch, inner(steps=5, mode="truncated", truncate=5)).grad_sum),
                       second)
    assert torch.equal(flat(meta_gradient(model, params, batch, inner(steps=5, mode="truncated", truncate=0)).grad_sum),
                       first)
    middle = flat(meta_gradient(model, params, batch, inner(steps=5, mode="truncated", truncate=2)).grad_sum)
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
    engine = flat(meta_gradient(model, params, batch, inner(steps=3, mode="first_order")).grad_sum)
    assert torch.allclose(engine, expected, rtol=1e-10, atol=1e-12)


def test_zero_inner_steps_is_plain_gradient(setup):
    model, params, batch = setup
    loss = sum(mse(functional_forward(model, params, batch.query_x[i]), batch.query_y[i]) for i in range(4))
    expected = flat(dict(zip(params, torch.autograd.grad(loss, list(params.values())))))
    assert torch.allclose(flat(meta_gradient(model, params, batch, inner(steps=0)).grad_sum), expected, rtol=1e-12)


def test_inner_loop_is_sgd(setup):
    model, params, batch = setup
    task = batch.task(0)
    adapted = inner_loop(model, params, task.support_x, task.support_y, LR, 1)
    loss = mse(functional_forward(model, params, task.support_x), task.support_y)
    grads = torch.autograd.grad(loss, list(params.values()))
    for (name, value), grad in zip(params.items(), grads):
        assert torch.allclose(adapted[name], value - LR * grad)
    result = adapt(model, params, batch.support_x, batch.support_y, inner())
    assert result.batched and torch.allclose(result.adapted["net.0.bias"][0], adapted["net.0.bias"])


def test_reptile_is_theta_minus_the_adapted_weights(setup):
    """Reptile by definition, against plain SGD written out task by task."""
    model, params, batch = setup
    spec = inner(steps=4, mode="reptile")
    expected = {name: torch.zeros_like(value) for name, value in params.items()}
    for i in range(batch.num_tasks):
        task = batch.task(i)
        phi = inner_loop(model, detached(params), task.support_x, task.support_y, LR, 4, "first_order")
        for name in params:
            expected[name] += params[name].detach() - phi[name].detach()
    engine = meta_gradient(model, params, batch, spec)
    torch.testing.assert_close(flat(engine.grad_sum), flat(expected), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(flat(meta_gradient_loop(model, params, batch, spec).grad_sum), flat(expected),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["second_order", "first_order", "truncated"])
def test_anil_holds_the_body_fixed_in_the_inner_loop_and_still_meta_trains_it(setup, mode):
    model, params, batch = setup
    spec = inner("meta_sgd", 3, mode, 1 if mode == "truncated" else None, adapt=("net.4",))
    theta = with_learned(params, spec)
    assert sorted(n for n in theta if n.startswith(LEARNED)) == ["inner.lr.net.4.bias", "inner.lr.net.4.weight"]
    result = adapt(model, theta, batch.support_x, batch.support_y, spec, trajectory=True)
    assert set(result.adapted) == {"net.4.weight", "net.4.bias"}
    assert all(torch.equal(result.fixed[name], params[name]) for name in params if not name.startswith("net.4"))
    assert all(point["net.4.weight"].shape == (4, 1, 8) for point in result.trajectory)
    grads = meta_gradient(model, theta, batch, spec)
    for name in ("net.0.weight", "net.2.weight", "net.4.weight", "inner.lr.net.4.weight"):
        assert grads.grad_sum[name].abs().max() > 1e-6, name
    torch.testing.assert_close(flat(grads.grad_sum), flat(meta_gradient_loop(model, theta, batch, spec).grad_sum),
                               rtol=1e-10, atol=1e-13)


def test_differentiable_adam_stays_finite_where_an_inner_gradient_is_exactly_zero(setup):
    """A dead ReLU unit: its weights' inner gradients are exactly 0, so Adam's second moment is 0
    there, where sqrt has an infinite derivative. The meta-gradient must stay finite."""
    model, params, batch = setup
    dead = {**params, "net.0.bias": params["net.0.bias"].detach().clone()}
    dead["net.0.bias"][0] = -1e3  # unit 0 of the first layer never activates
    dead["net.0.bias"].requires_grad_()
    spec = inner("adam", 3)
    result = meta_gradient(model, dead, batch, spec)
    assert all(torch.isfinite(g).all() for g in result.grad_sum.values())
    torch.testing.assert_close(flat(result.grad_sum), flat(meta_gradient_loop(model, dead, batch, spec).grad_sum),
                               rtol=1e-10, atol=1e-13)


def test_multi_step_loss_weights_the_query_loss_after_every_step(setup):
    model, params, batch = setup
    spec = inner("lslr", 3)
    theta = with_learned(params, spec)
    weights = torch.tensor([0.2, 0.3, 0.5], dtype=torch.float64)
    got = meta_gradient(model, theta, batch, spec, step_weights=weights)
    # By hand: the query loss after each step of the reference unroll, weighted.
    total = 0
    for i in range(batch.num_tasks):
        task = batch.task(i)
        visited = reference_adapt(model, theta, task.support_x, task.support_y, spec)
        total = total + sum(w * mse(functional_forward(model, v, task.query_x), task.query_y)
                            for w, v in zip(weights, visited))
    expected = torch.autograd.grad(total, list(theta.values()))
    torch.testing.assert_close(flat(got.grad_sum), torch.cat([g.reshape(-1) for g in expected]), rtol=1e-10,
                               atol=1e-13)
    last_only = meta_gradient(model, theta, batch, spec, step_weights=torch.tensor([0.0, 0.0, 1.0],
                                                                                   dtype=torch.float64))
    torch.testing.assert_close(flat(last_only.grad_sum), flat(meta_gradient(model, theta, batch, spec).grad_sum),
                               rtol=1e-12, atol=1e-15)


def test_multi_step_weights_anneal_towards_the_last_step():
    assert multi_step_weights(4, 0, 100) == [0.25] * 4
    middle = multi_step_weights(4, 50, 100)
    assert middle[:3] == [0.125] * 3 and middle[3] == pytest.approx(0.625)
    end = multi_step_weights(4, 10_000, 100)
    assert end[:3] == [0.0075] * 3 and sum(end) == pytest.approx(1)
    assert multi_step_weights(1, 5, 100) == [1.0]
    assert multi_step_weights(2, 10 ** 6, 0) == [0.5, 0.5]  # anneal 0: the mean of the steps' losses, always


def test_mode_errors():
    assert differentiated_steps("truncated", 5, 2) == 2
    assert differentiated_steps("reptile", 5) == 0
    with pytest.raises(ValueError, match="truncate"):
        differentiated_steps("truncated", 2, 3)
    with pytest.raises(ValueError, match="mode must be one of"):
        differentiated_steps("zeroth_order", 2)
    with pytest.raises(ValueError, match="inner rule must be one of"):
        make_rule("rmsprop", 0.1)
