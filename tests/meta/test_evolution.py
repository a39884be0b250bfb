"""Evolution strategies (distmaml.meta.methods.evolution) against references that share none of its code.

- Antithetic ES on a quadratic: each pair's estimate is (eps eps^T / sigma^2) grad f exactly, and the mean
  over many pairs is the exact gradient within 4 standard errors (smoothing leaves a quadratic's gradient).
- PES is unbiased for the objective smoothed with an independent perturbation per truncation,
  sum_tau L_tau(phi + eps_1, ..., phi + eps_tau), with phi held fixed: on the influence-balancing system
  (Tallec & Ollivier 2017; benchmarks/influence_balancing.py) its estimate agrees with the paired Monte Carlo of exact full-unroll gradients
  under the same perturbations (plain autograd through a hand-written unroll) within 4 standard errors,
  while truncated ES, whose bias there is many standard errors, does not. The tolerances are z-scores
  from the measured spread of the pairs, not hand-picked constants.
"""

import pytest
import torch

from benchmarks.influence_balancing import SHIFT, SIGNS, STATES, Influence
from distmaml.meta import Inner, make_rule, meta_gradient, meta_gradient_loop
from distmaml.meta.functional import Noise
from distmaml.meta.methods import ES, PES, MethodError, make_method
from distmaml.meta.methods.evolution import draws
from distmaml.meta.online import OnlineProblem, Runs, advance, carried_on, with_rule

DTYPE = torch.float64


class Quadratic:
    """f(phi) = 1/2 (phi - c)^T A (phi - c), no inner step (the start is phi)."""

    def __init__(self):
        self.matrix = torch.tensor([[2.0, 0.5, 0.0], [0.5, 1.0, 0.0], [0.0, 0.0, 3.0]], dtype=DTYPE)

    def meta_parameters(self):
        return {"a": torch.zeros(3, dtype=DTYPE)}

    def inner_template(self):
        return {"w": torch.zeros(3, dtype=DTYPE)}

    def start(self, phi, task):
        return {"w": phi["a"] * 1.0}

    def inner_loss(self, weights, phi, task, step):
        return 0.5 * (weights["w"] ** 2).sum()

    def outer_loss(self, weights, phi, task):
        gap = weights["w"] - task["c"]
        return 0.5 * gap @ self.matrix @ gap


def exact_influence_gradients(theta, perturbations, unroll_steps):
    """d/dtheta of sum_tau L_tau for each row of `perturbations` ([particles, truncations]): truncation tau
    runs `unroll_steps` steps at theta + its perturbation; plain autograd through a hand-written unroll."""
    count, truncations = perturbations.shape
    at = torch.full((count,), theta, dtype=DTYPE, requires_grad=True)
    state, objective = torch.ones(count, STATES, dtype=DTYPE), 0.0
    for tau in range(truncations):
        for _ in range(unroll_steps):
            state = state @ SHIFT.T + (at + perturbations[:, tau])[:, None] * SIGNS
        objective = objective + 0.5 * (state[:, 0] - 1) ** 2
    return torch.autograd.grad(objective.sum(), at)[0]


def fresh_influence_runs(count, method=None):
    phi = {"theta": torch.tensor([0.5], dtype=DTYPE)}
    carry = method.carry_init(phi, count) if method is not None else None
    return Runs({"run": torch.arange(count)}, {"s": torch.ones(count, STATES, dtype=DTYPE)}, {},
                torch.zeros(count, dtype=torch.int64), carry)


def test_each_antithetic_pair_is_eps_eps_t_times_the_gradient_and_their_mean_the_gradient():
    problem, sigma = Quadratic(), 0.1
    phi = {"a": torch.tensor([0.3, -0.2, 0.5], dtype=DTYPE, requires_grad=True)}
    count = 300
    tasks = {"c": torch.tensor([1.0, 2.0, 3.0], dtype=DTYPE).repeat(count, 1)}
    exact = problem.matrix @ (phi["a"].detach() - tasks["c"][0])
    inner = Inner(make_rule("sgd", lr=0.1), 0, ES(sigma=sigma, pairs=1))
    key = torch.tensor(11)
    # One task at a time (each its own pair): every pair's estimate, against its closed form.
    each = meta_gradient_loop(problem, phi, tasks, inner, noise=Noise(key, torch.arange(count)))
    pairs = torch.stack([meta_gradient(problem, phi, tasks_i, inner, noise=Noise(key, torch.tensor([i]))).grad_sum["a"]
                         for i, tasks_i in enumerate({"c": c[None]} for c in tasks["c"])])
    eps = sigma * draws({"a": phi["a"]}, key, torch.arange(count))["a"]
    closed = eps * (eps @ exact)[:, None] / sigma ** 2
    torch.testing.assert_close(pairs, closed, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(each.grad_sum["a"], pairs.sum(0), rtol=1e-12, atol=1e-12)
    # The batched call draws the same pairs and sums them.
    batched = meta_gradient(problem, phi, tasks, inner, noise=Noise(key, torch.arange(count)))
    torch.testing.assert_close(batched.grad_sum["a"], pairs.sum(0), rtol=1e-12, atol=1e-12)
    z = (pairs.mean(0) - exact) / (pairs.std(0) / count ** 0.5)
    assert z.abs().max() < 4, z


def test_the_perturbations_are_standard_normal_and_a_function_of_key_pair_and_entry():
    phi = {"a": torch.zeros(2, 3, dtype=DTYPE), "b": torch.zeros(4, dtype=DTYPE)}
    z = draws(phi, torch.tensor(5), torch.arange(5000))
    values = torch.cat([z["a"].flatten(1), z["b"]], 1)
    assert abs(float(values.mean())) < 4 / (values.numel() ** 0.5)
    assert abs(float(values.var()) - 1) < 0.02
    again = draws(phi, torch.tensor(5), torch.tensor([17, 3]))  # any subset of pairs draws the same values
    assert torch.equal(again["a"], z["a"][[17, 3]]) and torch.equal(again["b"], z["b"][[17, 3]])
    other = draws(phi, torch.tensor(6), torch.tensor([17]))
    assert not torch.equal(other["b"][0], z["b"][17])


def _pes_sum_over_truncations(pairs, truncations, sigma, unroll_steps, reuse_noise=False):
    """PES with theta frozen over `truncations` truncations from fresh pairs: each pair's summed
    estimate ([pairs]) and the perturbation each run ran each truncation under ([2 pairs, truncations])."""
    method = PES(sigma=sigma, reuse_noise=reuse_noise)
    problem = OnlineProblem(Influence(), unroll_steps)
    inner = with_rule(Inner(make_rule("sgd", lr=1.0), unroll_steps, method), unroll_steps)
    phi = {"theta": torch.tensor([0.5], dtype=DTYPE, requires_grad=True)}
    runs = fresh_influence_runs(2 * pairs, method)
    total, drawn, before = torch.zeros(pairs, dtype=DTYPE), [], torch.zeros(2 * pairs, dtype=DTYPE)
    for tau in range(truncations):
        result = meta_gradient(problem, phi, runs.as_tasks(), inner,
                               noise=Noise(torch.tensor(100 + tau), torch.arange(2 * pairs)))
        accumulated = result.carried["carry"]["perturbation"]["theta"][:, 0]
        drawn.append(accumulated if reuse_noise else accumulated - before)  # noise reuse carries eps itself
        before = accumulated
        losses = result.task_losses
        each = accumulated[0::2] * (losses[0::2] - losses[1::2]) / (2 * sigma ** 2)
        # The method's sum over runs is the pairs' estimates, each counted for its two runs.
        torch.testing.assert_close(result.grad_sum["theta"][0], 2 * each.sum(), rtol=1e-10, atol=1e-10)
        total += each
        runs = carried_on(runs, result.carried, unroll_steps)
    return total, torch.stack(drawn, 1)


def test_pes_is_unbiased_for_the_smoothed_objective_over_the_truncations():
    pairs, truncations, sigma, unroll_steps = 1500, 6, 0.1, 2
    estimate, perturbations = _pes_sum_over_truncations(pairs, truncations, sigma, unroll_steps)
    # The members of a pair ran under opposite perturbations, drawn afresh at every truncation.
    torch.testing.assert_close(perturbations[0::2], -perturbations[1::2], rtol=0, atol=1e-15)
    assert float(perturbations[0::2, 0].std()) == pytest.approx(sigma, rel=0.1)
    exact = exact_influence_gradients(0.5, perturbations, unroll_steps)
    reference = (exact[0::2] + exact[1::2]) / 2  # the pair's two exact gradients: paired Monte Carlo
    difference = estimate - reference
    z = float(difference.mean() / (difference.std() / pairs ** 0.5))
    assert abs(z) < 4, (z, float(estimate.mean()), float(reference.mean()))


def test_noise_reuse_pes_is_unbiased_for_one_perturbation_per_life():
    pairs, truncations, sigma, unroll_steps = 1500, 6, 0.1, 2
    estimate, perturbations = _pes_sum_over_truncations(pairs, truncations, sigma, unroll_steps, reuse_noise=True)
    assert torch.equal(perturbations, perturbations[:, :1].expand_as(perturbations))  # one eps per life
    exact = exact_influence_gradients(0.5, perturbations, unroll_steps)
    difference = estimate - (exact[0::2] + exact[1::2]) / 2
    z = float(difference.mean() / (difference.std() / pairs ** 0.5))
    assert abs(z) < 4, z


def test_truncated_es_is_biased_where_pes_is_not():
    """Truncated ES moves one shared state at the unperturbed theta and sees only each truncation's own
    influence: on influence balancing its sum over truncations is many standard errors off the exact
    gradient of the summed loss (which smoothing does not change: the loss is quadratic in theta), where
    PES, from the same start, is within 4 of its own (the test above). Standard errors from batch means:
    30 groups of 50 pairs, each group one batched call."""
    truncations, sigma, unroll_steps, groups, size = 6, 0.1, 2, 30, 50
    problem = OnlineProblem(Influence(), unroll_steps)
    inner = with_rule(Inner(make_rule("sgd", lr=1.0), unroll_steps, ES(sigma=sigma, pairs=1)), unroll_steps)
    phi = {"theta": torch.tensor([0.5], dtype=DTYPE, requires_grad=True)}
    runs = fresh_influence_runs(size)  # identical runs (one shared state), each with its own pair
    total = torch.zeros(groups, dtype=DTYPE)
    for tau in range(truncations):
        for group in range(groups):
            noise = Noise(torch.tensor(200 + tau), group * size + torch.arange(size))
            total[group] += meta_gradient(problem, phi, runs.as_tasks(), inner, noise=noise).grad_sum["theta"][0] / size
        runs = advance(problem, inner, {"theta": phi["theta"].detach()}, runs, unroll_steps)
    exact = float(exact_influence_gradients(0.5, torch.zeros(1, truncations, dtype=DTYPE), unroll_steps)[0])
    standard_error = float(total.std()) / groups ** 0.5
    assert abs(float(total.mean()) - exact) > 8 * standard_error, (float(total.mean()), exact, standard_error)


@pytest.mark.parametrize("name, settings, message", [
    ("es", {"sigma": 0.0}, "es.sigma = 0.0: must be > 0"),
    ("pes", {"sigma": -1.0}, "es.sigma = -1.0: must be > 0"),
    ("es", {"pairs": 0}, "es.pairs = 0: must be >= 1"),
    ("es", {"sigma_of": ["inner.lr"]}, "es.sigma_of = 'inner.lr': each entry is 'name-prefix=sigma'"),
    ("pes", {"sigma_of": ["inner.lr=-2"]}, "es.sigma_of = 'inner.lr=-2': each entry"),
])
def test_bad_settings_are_refused_in_one_line(name, settings, message):
    with pytest.raises(MethodError, match=message.replace("(", r"\(")):
        make_method(name, **settings)


def test_sigma_of_names_a_tensor_s_own_scale_by_its_longest_prefix():
    method = ES(sigma=0.01, sigma_of=("inner=0.5", "inner.lr=0.3"))
    assert method.scales({"inner.lr.w": None, "inner.x": None, "decay": None}) == {
        "inner.lr.w": 0.3, "inner.x": 0.5, "decay": 0.01}


def test_pes_needs_its_pairs_together():
    method = PES(sigma=0.1)
    problem = OnlineProblem(Influence(), 1)
    inner = with_rule(Inner(make_rule("sgd", lr=1.0), 1, method), 1)
    runs = fresh_influence_runs(4, method)
    phi = {"theta": torch.tensor([0.5], dtype=DTYPE, requires_grad=True)}
    with pytest.raises(MethodError, match="antithetic pairs"):
        meta_gradient(problem, phi, runs.as_tasks(), inner, noise=Noise(torch.tensor(0), torch.tensor([1, 2, 3, 4])))


def test_pes_one_pair_at_a_time_is_the_batched_estimate_and_carries_the_runs_alike():
    method = PES(sigma=0.1)
    problem = OnlineProblem(Influence(), 2)
    inner = with_rule(Inner(make_rule("sgd", lr=1.0), 2, method), 2)
    runs = fresh_influence_runs(6, method)
    phi = {"theta": torch.tensor([0.5], dtype=DTYPE, requires_grad=True)}
    noise = Noise(torch.tensor(7), torch.arange(6))
    for _ in range(2):  # the second time with carries that are not zero
        batched = meta_gradient(problem, phi, runs.as_tasks(), inner, noise=noise)
        looped = meta_gradient_loop(problem, phi, runs.as_tasks(), inner, noise=noise)
        torch.testing.assert_close(looped.grad_sum["theta"], batched.grad_sum["theta"], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(looped.carried["weights"]["s"], batched.carried["weights"]["s"], rtol=0, atol=0)
        torch.testing.assert_close(looped.carried["carry"]["perturbation"]["theta"],
                                   batched.carried["carry"]["perturbation"]["theta"], rtol=0, atol=0)
        runs = carried_on(runs, batched.carried, 2)


def test_es_with_several_pairs_and_tasks_is_each_pair_s_closed_form_summed():
    """The particles' order (task, pair, +/-): 3 tasks of 3 pairs each, against the closed form of every
    pair from the draws of the pairs' global indices (task i's pair p is i * 3 + p)."""
    problem, sigma, pairs = Quadratic(), 0.1, 3
    phi = {"a": torch.tensor([0.3, -0.2, 0.5], dtype=DTYPE, requires_grad=True)}
    tasks = {"c": torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 0.5], [2.0, 0.0, -1.0]], dtype=DTYPE)}
    inner = Inner(make_rule("sgd", lr=0.1), 0, ES(sigma=sigma, pairs=pairs))
    key = torch.tensor(4)
    result = meta_gradient(problem, phi, tasks, inner, noise=Noise(key, torch.tensor([5, 0, 2])))
    expected = torch.zeros(3, dtype=DTYPE)
    for task, index in enumerate([5, 0, 2]):
        gradient = problem.matrix @ (phi["a"].detach() - tasks["c"][task])
        eps = sigma * draws({"a": phi["a"]}, key, index * pairs + torch.arange(pairs))["a"]
        expected += (eps * (eps @ gradient)[:, None] / sigma ** 2).mean(0)
    torch.testing.assert_close(result.grad_sum["a"], expected, rtol=1e-9, atol=1e-12)
