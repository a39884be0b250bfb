import pytest
import torch

import distmaml.evaluate as ev  # noqa: E402
from distmaml.models import MLP
from distmaml.tasks.rng import STREAM_EVAL
from distmaml.tasks.sine import SineTasks


@pytest.fixture
def setup():
    torch.manual_seed(1)
    model = MLP(1, [16, 16], 1).double()
    return model, dict(model.named_parameters()), SineTasks(seed=2, dtype=torch.float64)


def test_batched_curves_equal_one_task_at_a_time(setup):
    model, params, family = setup
    batch = family.sample(STREAM_EVAL, 0, torch.arange(6), support=5, query=20)
    curves = ev.adaptation_curves(model, params, batch, 0.02, 4, family)
    assert curves["loss"].shape == (5, 6)
    for i in range(6):
        task = batch.task(i)
        losses = ev.test_adaptation(model, params, task.support_x, task.support_y, task.query_x, task.query_y,
                                    0.02, 4, family.loss)
        assert torch.allclose(curves["loss"][:, i], torch.tensor(losses, dtype=torch.float64), rtol=1e-10)


def test_evaluate_reports_mean_and_ci_per_step(setup):
    model, params, family = setup
    result = ev.evaluate(model, params, family, inner_lr=0.02, steps=3, tasks=50, shots=5, query=30, chunk=16)
    assert result["tasks"] == 50 and result["shots"] == 5
    assert [row["step"] for row in result["steps"]] == [0, 1, 2, 3]
    # Same numbers as computing all 50 tasks in one batch (chunking is invisible).
    batch = family.sample(STREAM_EVAL, 0, torch.arange(50), support=5, query=30)
    losses = ev.adaptation_curves(model, params, batch, 0.02, 3, family)["loss"]
    for row, step_losses in zip(result["steps"], losses):
        assert row["loss"] == pytest.approx(step_losses.mean().item(), rel=1e-12)
        assert row["loss_ci95"] == pytest.approx(1.96 * step_losses.std().item() / 50 ** 0.5, rel=1e-9)
    table = ev.format_table(result)
    assert table.splitlines()[0] == "| steps | query loss (95% CI) | support loss (95% CI) |"
    assert len(table.splitlines()) == 6


def test_mean_ci95():
    mean, half = ev.mean_ci95(torch.tensor([1.0, 3.0]))
    assert mean == 2.0 and half == pytest.approx(1.96 * 2 ** 0.5 / 2 ** 0.5)


def test_safeguarded_proximal_evaluation_adapts_as_implicit_training_does(setup):
    from distmaml.meta.implicit import regularised_adapt
    model, params, family = setup
    batch = family.sample(STREAM_EVAL, 0, torch.arange(5), support=10, query=20)
    lam, lr, steps = 2.0, 0.3, 4  # a step the cap must shorten for these tasks
    curves = ev.adaptation_curves(model, params, batch, lr, steps, family, prox_lam=lam, prox_safeguard=True)
    phi = regularised_adapt(model, params, batch.support_x, batch.support_y, lr, steps, lam, family.loss,
                            safeguard=True)
    expected = ev.query_metrics(model, phi, True, batch.query_x, batch.query_y, family)["loss"]
    torch.testing.assert_close(curves["loss"][-1], expected, rtol=1e-10, atol=0)
    plain = ev.adaptation_curves(model, params, batch, lr, steps, family, prox_lam=lam)
    assert not torch.allclose(plain["loss"][-1], curves["loss"][-1], rtol=1e-3)
