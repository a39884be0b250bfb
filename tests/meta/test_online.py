"""Online bi-level optimisation (distmaml.meta.online, distmaml.engine.schedule): persistent runs.

The references are hand-written per run in plain autograd on the model alone (torch.func.functional_call):
Learning to Reweight's batch weights and step, Meta-Weight-Net's one-step-lookahead hypergradient and
its order (lookahead with the current net, the net's update, the real step with the new net). The
episodic engine is the reference of an online step from a fresh state (an identity).
"""

from typing import Any, NamedTuple

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from distmaml.config import load_config
from distmaml.engine.schedule import Online
from distmaml.meta import (Dataset, FirstOrder, Inner, LearningToReweight, Reweighting, TrainingRun, WeightingNet,
                           make_method, make_rule, meta_gradient, meta_parameters, unroll)
from distmaml.meta.rules import SGD, Adam
from distmaml.meta.online import OnlineProblem, Runs, advance, fresh_runs, select, staggered_steps, with_rule
from distmaml.meta.problems.training import cross_entropy
from distmaml.tasks.runs import TrainingRuns
from conftest import REPO

DTYPE = torch.float64
BATCH = 6


def small_data(seed: int = 0) -> Dataset:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(40, 4, generator=generator, dtype=DTYPE)
    y = torch.randint(0, 3, (40,), generator=generator)
    return Dataset(x[:24], y[:24], x[24:32], y[24:32], x[32:], y[32:])


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DTYPE)


def runs_of(problem, rule, phi, seeds=(3, 8, 13), steps=(0, 4, 9)) -> Runs:
    tasks = {"seed": torch.tensor(seeds)}
    return fresh_runs(problem, rule, phi, tasks, torch.tensor(steps))


# ------------------------------------------------------------------------------------------ identities


# Every method with every rule it takes episodically (implicit: plain SGD; finite difference: a step linear
# in the gradient).
COMBINATIONS = [(rule, method) for rule in ("sgd", "momentum", "meta_sgd", "adam")
                for method in ("second_order", "truncated", "finite_difference", "implicit", "neumann")
                if not (method in ("implicit", "neumann") and rule != "sgd")
                and not (method == "finite_difference" and rule == "adam")]


@pytest.mark.parametrize("rule, method", COMBINATIONS)
def test_an_online_step_from_a_fresh_state_is_the_episodic_hypergradient(rule, method):
    """U = K = H from a fresh state: the same unroll, the same hypergradient (bitwise but for Adam, whose
    bias correction at a tensor counter is written out rather than fused)."""
    made = make_rule(rule, 0.1, steps=3, **({"momentum": 0.9} if rule == "momentum" else {}))
    problem = Reweighting(small_model(), small_data(), batch_size=BATCH)
    inner = Inner(made, 3, make_method("truncated", truncate=2) if method == "truncated" else make_method(method))
    phi = meta_parameters(problem, inner)
    runs = runs_of(problem, made, phi, steps=(0, 0, 0))
    episodic = meta_gradient(problem, phi, runs.tasks, inner)
    online = meta_gradient(OnlineProblem(problem), phi, runs.as_tasks(), with_rule(inner, 3))
    for name in phi:
        if rule == "adam":
            torch.testing.assert_close(online.grad_sum[name], episodic.grad_sum[name], rtol=1e-12, atol=1e-15)
        else:
            assert torch.equal(online.grad_sum[name], episodic.grad_sum[name]), name


def test_runs_advanced_in_pieces_are_the_episode_and_reads_each_runs_counter():
    """Two advances of 3 steps are one episode of 6 (the mini-batches and Adam's bias correction follow
    each run's own counter), and a run at counter c draws step c's mini-batch, not step 0's."""
    problem = TrainingRun(small_model(), small_data(), batch_size=BATCH)
    rule = Adam(0.05)
    runs = runs_of(problem, rule, {}, steps=(0, 0, 0))
    inner = with_rule(Inner(rule, 3, FirstOrder()), 3)
    online = OnlineProblem(problem)
    pieces = advance(online, inner, {}, advance(online, inner, {}, runs, 3), 3)
    with torch.no_grad():
        whole = unroll(problem, {}, runs.tasks, Inner(rule, 6, FirstOrder()), differentiated=0)
    for name, value in whole.weights.items():
        torch.testing.assert_close(pieces.weights[name], value, rtol=1e-12, atol=1e-14)
    assert pieces.step.tolist() == [6, 6, 6]
    # At counter 5, the loss is step 5's mini-batch's.
    task = {"task": {"seed": torch.tensor(3)}, "weights": {k: v[0] for k, v in runs.weights.items()},
            "state": {}, "step": torch.tensor(5)}
    assert torch.equal(online.inner_loss(task["weights"], {}, task, 0),
                       problem.inner_loss(task["weights"], {}, {"seed": torch.tensor(3)}, 5))


def test_tensor_counters_give_the_rules_their_integer_results():
    weights = {"w": torch.randn(5, dtype=DTYPE)}
    grads = {"w": torch.randn(5, dtype=DTYPE)}
    adam = Adam(0.01)
    state = adam.init(weights)
    for step in (0, 3, 17):
        by_int, _ = adam.step(weights, grads, state, {}, step)
        by_tensor, _ = adam.step(weights, grads, state, {}, torch.tensor(step))
        torch.testing.assert_close(by_tensor["w"], by_int["w"], rtol=1e-14, atol=0)
    schedule = make_rule("schedule", 0.1, steps=10, blocks=5)
    learned = schedule.parameters(weights)
    learned = {name: torch.log(torch.arange(1.0, 6.0, dtype=DTYPE)) for name in learned}
    for step in (0, 1, 2, 9, 12):  # past the horizon: the last block
        by_int, _ = schedule.step(weights, grads, {}, learned, step)
        by_tensor, _ = schedule.step(weights, grads, {}, learned, torch.tensor(step))
        assert torch.equal(by_tensor["w"], by_int["w"]), step


def test_staggered_counters_are_multiples_of_the_unroll_spread_over_the_horizon():
    assert staggered_steps(torch.arange(4), 4, 10, 100).tolist() == [0, 20, 50, 70]
    assert staggered_steps(torch.arange(3), 3, 2, 6).tolist() == [0, 2, 4]
    assert staggered_steps(torch.arange(2), 2, 5, 0).tolist() == [0, 0]  # no horizon: all start together
    assert staggered_steps(torch.arange(2, 4), 4, 1, 8).tolist() == [4, 6]  # a shard's share


# ----------------------------------------------------------------------- hand-written references


def _losses(model, weights, x, y):
    return F.cross_entropy(functional_call(model, weights, (x,)), y, reduction="none")


def _l2rw_step(model, weights, x, y, val_x, val_y, lr):
    """Ren et al.'s step for one run, in plain autograd: eps, the lookahead, the weights, the real step."""
    params = {name: value.detach().requires_grad_() for name, value in weights.items()}
    eps = torch.zeros(x.shape[0], dtype=x.dtype, requires_grad=True)
    step = torch.autograd.grad((eps * _losses(model, params, x, y)).sum(), list(params.values()), create_graph=True)
    lookahead = {name: value - lr * g for (name, value), g in zip(params.items(), step)}
    found, = torch.autograd.grad(F.cross_entropy(functional_call(model, lookahead, (val_x,)), val_y), eps)
    raw = torch.clamp(-found, min=0)
    example_weights = raw / raw.sum() if raw.sum() > 0 else raw
    real = torch.autograd.grad((example_weights * _losses(model, params, x, y)).sum(), list(params.values()))
    return {name: value.detach() - lr * g for (name, value), g in zip(params.items(), real)}, example_weights


def test_learning_to_reweight_weights_and_step_equal_ren_et_al_by_hand():
    model, data = small_model(), small_data()
    problem = LearningToReweight(model, data, batch_size=BATCH)
    rule = SGD(0.3)
    runs = runs_of(problem, rule, {})
    moved = advance(OnlineProblem(problem), with_rule(Inner(rule, 1, FirstOrder()), 1), {}, runs, 1)
    for i, seed in enumerate(runs.tasks["seed"]):
        task, step = {"seed": seed}, int(runs.step[i])
        x, y = problem.batch(task, step)
        weights = {name: value[i] for name, value in runs.weights.items()}
        expected, example_weights = _l2rw_step(model, weights, x, y, data.val_x, data.val_y, 0.3)
        torch.testing.assert_close(problem.example_weights(weights, {}, task, step), example_weights,
                                   rtol=1e-10, atol=1e-14)
        assert float(example_weights.sum()) == pytest.approx(1.0) and bool((example_weights >= 0).all())
        for name, value in expected.items():
            torch.testing.assert_close(moved.weights[name][i], value, rtol=1e-10, atol=1e-14)


def _net_weights(net, losses):
    hidden = torch.relu(F.linear(losses.detach().unsqueeze(-1), net["weighting_net.0.weight"],
                                 net["weighting_net.0.bias"]))
    return torch.sigmoid(F.linear(hidden, net["weighting_net.2.weight"], net["weighting_net.2.bias"])).squeeze(-1)


def _mwn_inner(model, weights, net, x, y):  # Shu et al.'s mean of the weighted losses
    losses = _losses(model, weights, x, y)
    return (_net_weights(net, losses) * losses).mean()


def _mwn_hypergradient(model, weights, net, x, y, val_x, val_y, lr):
    """Shu et al.'s lookahead for one run, in plain autograd: the net's gradient of the validation loss
    after one SGD step on the net-weighted mean loss."""
    params = {name: value.detach().requires_grad_() for name, value in weights.items()}
    step = torch.autograd.grad(_mwn_inner(model, params, net, x, y), list(params.values()), create_graph=True)
    lookahead = {name: value - lr * g for (name, value), g in zip(params.items(), step)}
    return torch.autograd.grad(F.cross_entropy(functional_call(model, lookahead, (val_x,)), val_y),
                               list(net.values()))


class _Learner(NamedTuple):
    model: Any
    family: Any
    problem: Any
    inner: Any
    theta: dict


def test_meta_weight_net_step_is_shus_lookahead_update_and_real_step():
    """Through the engine's schedule: the hypergradient summed over runs equals the hand-written
    lookahead's; after the update of the net, each run's real step uses the updated net."""
    model, data = small_model(), small_data()
    family = TrainingRuns(data, cross_entropy, None, 3, seed=5)
    problem = WeightingNet(model, data, batch_size=BATCH, hidden=7, normalised=False)  # Shu et al.'s mean
    inner = Inner(SGD(0.3), 1, make_method("second_order"))
    phi = {name: value.requires_grad_() for name, value in meta_parameters(problem, inner).items()}
    config = load_config(REPO / "configs/mnist1d_mwn_online.yaml", ["online.runs=3", "online.horizon=4"])
    online = Online(_Learner(model, family, problem, inner, phi), config, torch.arange(3))
    online.start()
    before = online.runs
    _, tasks, result = online.lookahead(0, inner, lambda problem, tasks, inner, noise: meta_gradient(problem, phi, tasks,
                                                                                             inner))
    expected = [torch.zeros_like(value) for value in phi.values()]
    for i in range(3):
        task, step = {"seed": before.tasks["seed"][i]}, int(before.step[i])
        x, y = problem.batch(task, step)
        found = _mwn_hypergradient(model, {n: v[i] for n, v in before.weights.items()}, phi, x, y, data.val_x,
                                   data.val_y, 0.3)
        expected = [total + g for total, g in zip(expected, found)]
    for (name, value), reference in zip(result.grad_sum.items(), expected):
        torch.testing.assert_close(value, reference, rtol=1e-10, atol=1e-14)
    with torch.no_grad():  # the outer step (plain SGD here: any step will do)
        updated = {name: value - 0.5 * result.grad_sum[name] for name, value in phi.items()}
        for name, value in phi.items():
            value.copy_(updated[name])
    online.advance(phi)
    for i in range(3):
        task, step = {"seed": before.tasks["seed"][i]}, int(before.step[i])
        x, y = problem.batch(task, step)
        params = {n: v[i].detach().requires_grad_() for n, v in before.weights.items()}
        grads = torch.autograd.grad(_mwn_inner(model, params, updated, x, y), list(params.values()))
        for (name, value), g in zip(params.items(), grads):
            torch.testing.assert_close(online.runs.weights[name][i], value.detach() - 0.3 * g, rtol=1e-10,
                                       atol=1e-14)
    assert online.runs.step.tolist() == [int(s) + 1 for s in before.step]


def test_staggered_runs_each_start_again_once_per_horizon():
    """Over H / U outer steps every run starts again exactly once, with a new key, and its counter
    comes back to where it started: the counters keep covering the horizon. A run starts again before
    the lookahead after it reached the horizon, so until then it is the finished network."""
    model, data = small_model(), small_data()
    family = TrainingRuns(data, cross_entropy, None, 3, seed=5)
    problem = Reweighting(model, data, batch_size=BATCH)
    inner = Inner(SGD(0.1), 2, make_method("second_order"))
    phi = meta_parameters(problem, inner)
    config = load_config(REPO / "configs/mnist1d_mwn_online.yaml",
                         ["problem.name=hyperclean", "online.runs=4", "online.unroll=2", "online.horizon=8"])
    online = Online(_Learner(model, family, problem, inner, phi), config, torch.arange(4))
    online.start()
    first_keys = online.runs.tasks["seed"].clone()
    assert online.runs.step.tolist() == [0, 2, 4, 6]  # burned in to staggered counters
    for iteration in range(4):
        online.lookahead(iteration, inner, lambda p, t, i, noise: meta_gradient(p, phi, t, i))
        online.advance(phi)
    assert online.runs.step.tolist() == [8, 2, 4, 6] and online.lives.tolist() == [0, 1, 1, 1]
    online.lookahead(4, inner, lambda p, t, i, noise: meta_gradient(p, phi, t, i))
    assert online.runs.step.tolist() == [0, 2, 4, 6] and online.lives.tolist() == [1, 1, 1, 1]
    assert online.failures.tolist() == [0, 0, 0, 0]
    assert not bool((online.runs.tasks["seed"] == first_keys).any())


def test_a_run_that_is_not_finite_is_left_out_and_starts_again():
    model, data = small_model(), small_data()
    family = TrainingRuns(data, cross_entropy, None, 3, seed=5)
    problem = Reweighting(model, data, batch_size=BATCH)
    inner = Inner(SGD(0.1), 1, make_method("second_order"))
    phi = meta_parameters(problem, inner)
    config = load_config(REPO / "configs/mnist1d_mwn_online.yaml", ["problem.name=hyperclean", "online.runs=3"])
    online = Online(_Learner(model, family, problem, inner, phi), config, torch.arange(3))
    online.start()
    broken = next(iter(online.runs.weights))
    online.runs.weights[broken][1].fill_(float("nan"))
    healthy = meta_gradient(OnlineProblem(problem), phi, _without(online.runs, 1).as_tasks(), with_rule(inner, 1))
    _, tasks, result = online.lookahead(0, inner, lambda p, t, i, noise: meta_gradient(p, phi, t, i))
    assert online.bad.tolist() == [False, True, False] and int(online.excluded(torch.device("cpu"))) == 1
    for name in phi:
        assert torch.equal(result.grad_sum[name], healthy.grad_sum[name])
    online.advance(phi)
    assert online.failures.tolist() == [0, 1, 0] and online.lives.tolist() == [0, 1, 0]
    assert online.runs.step.tolist() == [1, 0, 1]
    assert bool(torch.isfinite(online.runs.weights[broken]).all())


def _without(runs: Runs, index: int) -> Runs:
    keep = torch.ones_like(runs.step, dtype=torch.bool)
    keep[index] = False
    return select(runs, keep)


def test_vmapped_losses_take_a_batched_counter():
    problem = WeightingNet(small_model(), small_data(), batch_size=BATCH, hidden=3)
    phi = problem.meta_parameters()
    weights = vmap(lambda seed: problem.start(phi, {"seed": seed}))(torch.tensor([1, 2]))
    losses = vmap(problem.inner_loss, in_dims=(0, None, 0, 0))(weights, phi, {"seed": torch.tensor([1, 2])},
                                                                torch.tensor([0, 7]))
    assert torch.equal(losses[1], problem.inner_loss({k: v[1] for k, v in weights.items()}, phi,
                                                     {"seed": torch.tensor(2)}, 7))


def test_hypergradient_descent_is_the_next_batch_gradient_dotted_with_this_one():
    """training_run.outer=next_batch with U = 1 and one learned rate: Baydin et al.'s hypergradient,
    d l_{c+1}(w - a g_c) / d log a = -a grad l_{c+1}(w_1) . grad l_c(w), run by run, by hand."""
    model, data = small_model(), small_data()
    problem = TrainingRun(model, data, batch_size=BATCH, outer_batch=True)
    rule = make_rule("schedule", 0.3, steps=20)
    inner = Inner(rule, 1, make_method("second_order"))
    phi = meta_parameters(problem, inner)
    runs = runs_of(problem, rule, phi)
    found = meta_gradient(OnlineProblem(problem, 1), phi, runs.as_tasks(), with_rule(inner, 1)).grad_sum
    expected = torch.zeros(())
    for i, seed in enumerate(runs.tasks["seed"]):
        task, step = {"seed": seed}, int(runs.step[i])
        params = {name: value[i].detach().requires_grad_() for name, value in runs.weights.items()}
        x, y = problem.batch(task, step)
        now = torch.autograd.grad(cross_entropy(functional_call(model, params, (x,)), y), list(params.values()))
        after = {name: (value - 0.3 * g).detach().requires_grad_() for (name, value), g in zip(params.items(), now)}
        x_next, y_next = problem.batch(task, step + 1)
        following = torch.autograd.grad(cross_entropy(functional_call(model, after, (x_next,)), y_next),
                                        list(after.values()))
        expected = expected - 0.3 * sum((a * b).sum() for a, b in zip(following, now))
    torch.testing.assert_close(found["inner.lr.log_schedule"], expected.reshape(1), rtol=1e-10, atol=1e-14)
