"""The examples a user copies from: each runs and does what it says."""

import sys

import torch

from conftest import REPO

sys.path.insert(0, str(REPO))
from examples.custom_loop import PulledMAML, TwoInputNet, train  # noqa: E402

from distmaml.meta import Inner, check_problem, make_rule, meta_gradient, meta_gradient_loop, meta_parameters  # noqa
from distmaml.tasks.sine import SineTasks  # noqa: E402


def test_a_custom_problem_with_two_inputs_follows_the_protocol_and_its_gradient_is_the_reference_s():
    torch.manual_seed(0)
    problem = PulledMAML(TwoInputNet(8).double())
    inner = Inner(make_rule("meta_sgd", 0.01), 2)
    phi = meta_parameters(problem, inner)
    assert sorted({name.split(".")[0] for name in phi}) == ["features", "head", "inner", "log_pull", "x"]
    tasks = SineTasks(dtype=torch.float64).sample(0, 0, torch.arange(3))
    check_problem(problem, phi, tasks.task(0))
    batched, looped = meta_gradient(problem, phi, tasks, inner), meta_gradient_loop(problem, phi, tasks, inner)
    for name in phi:
        torch.testing.assert_close(batched.grad_sum[name], looped.grad_sum[name], rtol=1e-10, atol=1e-13)
    assert batched.grad_sum["log_pull.head.3.weight"].abs().max() > 0  # the pull strengths are meta-learned


def test_the_custom_training_loop_learns():
    before, after = train(iterations=300)
    assert after < 0.25 * before, (before, after)
