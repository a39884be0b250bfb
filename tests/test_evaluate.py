import math

import pytest
import torch

import distmaml.evaluate as ev  # noqa: E402
from distmaml.meta import MAML, ImplicitCG, Inner, make_rule, meta_gradient_loop
from distmaml.models import MLP
from distmaml.rng import STREAM_EVAL
from distmaml.tasks.sine import SineTasks
from conftest import REPO


def sgd(lr):
    return Inner(make_rule("sgd", lr))


def proximal(lr, steps, safeguard):
    return Inner(make_rule("sgd", lr), steps, ImplicitCG(safeguard=safeguard))


@pytest.fixture
def setup():
    torch.manual_seed(1)
    model = MLP(1, [16, 16], 1).double()
    family = SineTasks(seed=2, dtype=torch.float64)
    return MAML(model, family.loss), dict(model.named_parameters()), family


def test_batched_curves_equal_one_task_at_a_time(setup):
    problem, params, family = setup
    batch = family.sample(STREAM_EVAL, 0, torch.arange(6), support=5, query=20)
    curves = ev.adaptation_curves(problem, params, batch, sgd(0.02), [0, 1, 2, 3, 4])
    assert set(curves) == {"loss", "support_loss"}  # regression: no accuracy
    assert curves["loss"].shape == curves["support_loss"].shape == (5, 6)
    for i in range(6):
        losses = ev.test_adaptation(problem.model, batch.task(i), params, sgd(0.02), steps=4)
        assert torch.allclose(curves["loss"][:, i], torch.tensor(losses, dtype=torch.float64), rtol=1e-10)
    # The weights behind the curves: each asked-for count of steps (0: theta itself, for every task).
    weights = ev.adaptation_weights(problem, params, batch, sgd(0.02), [0, 2, 4])
    assert sorted(weights) == [0, 2, 4]
    for name, value in params.items():
        assert torch.equal(weights[0][name], value.detach().expand(6, *value.shape))
    metrics = ev.task_metrics(problem, weights[2], params, batch)
    torch.testing.assert_close(metrics["loss"], curves["loss"][2], rtol=0, atol=0)
    torch.testing.assert_close(metrics["support_loss"], curves["support_loss"][2], rtol=0, atol=0)
    assert (curves["support_loss"][4] < curves["support_loss"][0]).all()  # the support set was fitted


def test_evaluate_reports_mean_and_ci_per_step(setup):
    problem, params, family = setup
    result = ev.evaluate(problem, params, family, sgd(0.02), steps=3, tasks=50, shots=5, query=30, chunk=16)
    assert result["tasks"] == 50 and result["shots"] == 5
    assert [row["step"] for row in result["steps"]] == [0, 1, 2, 3]
    # Same numbers as computing all 50 tasks in one batch (chunking is invisible).
    batch = family.sample(STREAM_EVAL, 0, torch.arange(50), support=5, query=30)
    losses = ev.adaptation_curves(problem, params, batch, sgd(0.02), [0, 1, 2, 3])["loss"]
    for row, step_losses in zip(result["steps"], losses):
        assert row["loss"] == pytest.approx(step_losses.mean().item(), rel=1e-12)
        assert row["loss_ci95"] == pytest.approx(1.96 * step_losses.std().item() / 50 ** 0.5, rel=1e-9)
    table = ev.format_table(result)
    assert table.splitlines()[0] == ("| steps | query loss (mean ± 95% CI) | query loss (median [IQR]) | "
                                     "support loss (mean ± 95% CI) | support loss (median [IQR]) | diverged tasks |")
    assert len(table.splitlines()) == 6


def test_mean_ci95():
    mean, half = ev.mean_ci95(torch.tensor([1.0, 3.0]))
    assert mean == 2.0 and half == pytest.approx(1.96 * 2 ** 0.5 / 2 ** 0.5)


def test_safeguarded_proximal_evaluation_adapts_as_implicit_training_does(setup):
    problem, params, family = setup
    imaml = MAML(problem.model, family.loss, proximal=2.0)
    batch = family.sample(STREAM_EVAL, 0, torch.arange(5), support=10, query=20)
    lr, steps = 0.3, 4  # a step the cap must shorten for these tasks
    guarded = proximal(lr, steps, safeguard=True)
    curves = ev.adaptation_curves(imaml, params, batch, guarded, list(range(steps + 1)))
    # The per-task reference writes the safeguarded inner loop out again; its task losses are the
    # query losses after the inner steps training takes.
    expected = meta_gradient_loop(imaml, params, batch, guarded).task_losses
    torch.testing.assert_close(curves["loss"][-1], expected, rtol=1e-10, atol=0)
    plain = ev.adaptation_curves(imaml, params, batch, proximal(lr, steps, safeguard=False), list(range(steps + 1)))
    assert not torch.allclose(plain["loss"][-1], curves["loss"][-1], rtol=1e-3)


def plant_blow_up(monkeypatch, task_index=7, scale=1e6):
    """Every evaluation batch gets one task whose support targets are `scale` times too large: its
    inner gradient steps explode, so its query loss becomes huge or non-finite after a few steps."""
    from distmaml.tasks.sine import SineTasks

    original = SineTasks.sample

    def sample(self, stream, iteration, indices, **kwargs):
        batch = original(self, stream, iteration, indices, **kwargs)
        if stream == STREAM_EVAL:
            planted = (indices == task_index)[:, None, None]
            batch = batch._replace(support_y=torch.where(planted, batch.support_y * scale, batch.support_y))
        return batch

    monkeypatch.setattr(SineTasks, "sample", sample)


def test_evaluation_counts_a_diverged_task_and_never_reports_its_mean(setup, monkeypatch):
    problem, params, family = setup
    plant_blow_up(monkeypatch)
    result = ev.evaluate(problem, params, family, sgd(0.02), steps=6, tasks=40, shots=5, query=20)
    steps = result["steps"]
    assert steps[0]["diverged"] == 0 and steps[-1]["diverged"] == 1 and steps[-1]["diverged_fraction"] == 1 / 40
    # The median of 40 tasks does not notice one blown-up task; the worst task is reported as such.
    assert steps[-1]["loss_median"] < 10 and not steps[-1]["loss_max"] < 1e6
    table = ev.format_table(result)
    last = table.splitlines()[-1]
    assert "diverged (1 tasks)" in last and last.endswith("| 1 / 40 |")
    assert "e+" not in table and "nan" not in table and "inf" not in table
    warning = ev.divergence_warning(result)
    assert warning.startswith("1 of 40 tasks diverged within 6 step(s), the first at step ")
    line = ev.final_line(result)
    assert line.startswith("eval on 40 fresh tasks: query loss ") and "1 of 40 tasks diverged" in line
    assert "e+" not in line and "nan" not in line


def test_diverged_means_non_finite_or_a_rise_beyond_the_task_s_or_the_median_task_s_scale():
    #                        task:  small start     ordinary    large start   non-finite   negative
    losses = torch.tensor([[0.1, 2.0, 20.0, 2.0, -3.0],
                           [9.0, 19.0, 150.0, math.nan, -2.0],   # rises of 8.9 / 17 / 130: none above 9x scale
                           [19.0, 19.5, 201.0, 1.0, 23.0]], dtype=torch.float64)
    # scale: max(|start|, median |start| = 2): 2, 2, 20, 2, 3; diverged once the rise exceeds 9x that
    assert ev.diverged_tasks(losses, 10.0).tolist() == [[False] * 5,
                                                         [False, False, False, True, False],
                                                         [True, False, True, False, False]]
    # Evaluated alone, the first task is its own median: its rise to 9 is then 90x its scale.
    assert ev.diverged_tasks(losses[:, :1], 10.0)[:, 0].tolist() == [False, True, True]


def test_distribution_of_values_with_non_finite_tasks():
    stats = ev.distribution(torch.tensor([1.0, 2.0, 3.0, float("nan")]))
    assert math.isnan(stats[""]) and math.isnan(stats["_ci95"]) and math.isnan(stats["_max"])
    assert stats["_median"] == 2.5 and stats["_q25"] == 1.75
    assert math.isnan(stats["_q75"])  # between 3 and the non-finite value, which ranks highest
    finite = ev.distribution(torch.tensor([4.0, 1.0, 3.0, 2.0, 5.0]))
    assert finite == {"": 3.0, "_ci95": pytest.approx(1.96 * 2.5 ** 0.5 / 5 ** 0.5), "_median": 3.0, "_q25": 2.0,
                      "_q75": 4.0, "_max": 5.0}


def test_evaluation_tasks_depend_on_the_evaluation_seed_only(setup):
    """Runs of different training seeds are compared on the same tasks (eval.seed)."""
    problem, params, _ = setup
    one = ev.evaluate(problem, params, SineTasks(seed=1, dtype=torch.float64), sgd(0.02), 2, tasks=10, seed=7)
    two = ev.evaluate(problem, params, SineTasks(seed=2, dtype=torch.float64), sgd(0.02), 2, tasks=10, seed=7)
    other = ev.evaluate(problem, params, SineTasks(seed=2, dtype=torch.float64), sgd(0.02), 2, tasks=10, seed=8)
    assert one["steps"] == two["steps"] and one["steps"] != other["steps"]


def test_evaluation_adapts_with_the_learned_rule(setup):
    """A Meta-SGD run is evaluated with its learned step sizes, as its training adapted."""
    from distmaml.meta import reference_unroll
    from distmaml.meta.functional import functional_forward

    problem, params, family = setup
    spec = Inner(make_rule("meta_sgd", 0.02), steps=3)
    learned = {name: value * torch.linspace(0.5, 3.0, value.numel(), dtype=value.dtype).view_as(value)
               for name, value in spec.rule.parameters({k: v.detach() for k, v in params.items()}).items()}
    theta = {**params, **learned}
    batch = family.sample(STREAM_EVAL, 0, torch.arange(4), support=5, query=20)
    curves = ev.adaptation_curves(problem, theta, batch, spec, [0, 1, 2, 3])
    for i in range(4):
        task = batch.task(i)
        weights = reference_unroll(problem, theta, task, spec, differentiated=0)[-1]
        expected = family.loss(functional_forward(problem.model, weights, task.query_x), task.query_y)
        torch.testing.assert_close(curves["loss"][3, i], expected.detach(), rtol=1e-10, atol=0)
    plain = ev.adaptation_curves(problem, params, batch, sgd(0.02), [0, 1, 2, 3])
    assert not torch.allclose(plain["loss"][3], curves["loss"][3], rtol=1e-3)


def test_a_long_evaluation_needs_no_memory_per_step(setup):
    """eval --steps 1000000000 once grew without bound: a view of phi for every step was made up front."""
    import tracemalloc

    from distmaml.engine import memory
    from distmaml.meta import step_views

    problem, params, family = setup
    with torch.no_grad():
        tracemalloc.start()
        views = step_views(params, 10 ** 5, make_rule("sgd", 0.1))
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert len(views) == 10 ** 5 and peak < 10 ** 5, peak
        assert len(views[5:8]) == 3 and all(torch.equal(views[-1][name], value) for name, value in params.items())
    # With autograd on, each step keeps its own slot of phi's gradient, as before.
    assert len(step_views(params, 3, make_rule("sgd", 0.1))) == 3
    long, short = (memory.estimate_evaluation(problem, params, family, sgd(0.1), steps, tasks=50, shots=5, query=20)
                   for steps in (10 ** 9, 100))
    assert long == short  # both report eleven numbers of steps; adapting keeps no graph


# ------------------------------------------------------------------ tasks without shots; steps past the trained ones

# A training-run problem in miniature: a learned schedule of 3 inner steps on the logistic family's 20
# training examples (configs/logistic_weight_decay.yaml, which needs no optional data package).
SCHEDULE_RUN = ["problem.name=learning_rate", "inner.rule=schedule", "inner.steps=3", "inner.mode=second_order",
                "inner.checkpoint=none", "train.iterations=2", "train.meta_batch=2", "train.log_every=1",
                "train.checkpoint_every=2", "eval.tasks=4", "eval.steps=3", "logging.progress=false",
                "logging.sharpness=false", "task.args.samples=40", "task.args.train=20", "task.args.test=20"]


def schedule_learner(*overrides):
    """The SCHEDULE_RUN learner as built before training (no run directory, nothing trained)."""
    from distmaml.build import build
    from distmaml.config import load_config

    return build(load_config(REPO / "configs/logistic_weight_decay.yaml", [*SCHEDULE_RUN, *overrides]))


def test_training_runs_are_evaluated_without_shots_and_a_number_of_them_is_refused():
    """Failed before: "shots" was the training split's size, and shots= / query= were ignored."""
    from distmaml.config import ConfigError

    learner = schedule_learner()
    result = ev.evaluate(learner.problem, learner.theta, learner.family, learner.inner, steps=3, tasks=4)
    assert result["shots"] is None and result["training_examples"] == 20 == learner.family.support
    assert ev.evaluated(result) == "4 fresh training runs of 3 inner steps on a data set of 20 training examples"
    assert "beyond_trained_steps" not in result  # 3 steps: those the schedule was trained for
    for asked, expected in (({"shots": 5}, "shots = 5: the tasks of family LogisticRuns are training runs on a fixed "
                                           "data set, not few-shot tasks; they have no shots"),
                            ({"query": 3}, "query = 3: the tasks of family LogisticRuns are training runs on a fixed "
                                           "data set, not few-shot tasks; they have no query set to size")):
        with pytest.raises(ConfigError) as refused:
            ev.evaluate(learner.problem, learner.theta, learner.family, learner.inner, steps=3, tasks=4, **asked)
        assert str(refused.value) == expected


def test_few_shot_evaluation_says_its_shots(setup):
    problem, params, family = setup
    result = ev.evaluate(problem, params, family, sgd(0.02), steps=1, tasks=4, shots=3)
    assert result["shots"] == 3 and "training_examples" not in result
    assert ev.evaluated(result) == "4 fresh tasks, 3-shot"


def test_steps_past_a_learned_schedule_use_its_last_block_as_the_warning_says():
    """Failed before: nothing said what rate an evaluation past the trained steps used."""
    from distmaml.meta import LEARNED

    learner = schedule_learner("inner.schedule_blocks=2")  # blocks: step 1-2, step 3
    theta = {**learner.theta, LEARNED + "log_schedule": torch.tensor([0.5, 0.25]).log()}
    result = ev.evaluate(learner.problem, theta, learner.family, learner.inner, steps=5, tasks=4)
    assert result["beyond_trained_steps"] == ("steps 4–5 use the schedule's last learned rate (block 2 of 2), 0.25, "
                                              "learned for step 3")
    # What the sentence says: the same as a schedule of five one-step blocks whose last three are that rate.
    spelled_out = Inner(make_rule("schedule", 1.0, steps=5, blocks=5), 5, learner.inner.method)
    rates = {**theta, LEARNED + "log_schedule": torch.tensor([0.5, 0.5, 0.25, 0.25, 0.25]).log()}
    again = ev.evaluate(learner.problem, rates, learner.family, spelled_out, steps=5, tasks=4)
    assert [row["loss"] for row in again["steps"]] == [row["loss"] for row in result["steps"]]
    one_block = schedule_learner()
    assert ev.evaluate(one_block.problem, one_block.theta, one_block.family, one_block.inner, steps=4,
                       tasks=2)["beyond_trained_steps"] == ("step 4 uses the schedule's one learned rate, 1, learned "
                                                            "for steps 1–3")


def test_steps_past_lslr_s_learned_sizes_use_the_last_step_s_as_the_warning_says(setup):
    problem, params, family = setup
    trained = Inner(make_rule("lslr", 0.02, steps=2), steps=2)
    learned = {name: torch.tensor([0.02, 0.05 if name.endswith("weight") else 0.04], dtype=torch.float64)
               for name in trained.rule.parameters(params)}
    result = ev.evaluate(problem, {**params, **learned}, family, trained, steps=4, tasks=4)
    assert result["beyond_trained_steps"] == ("steps 3–4 use the step sizes learned for step 2, the last one trained "
                                              "(one per weight tensor, 0.04 to 0.05)")
    spelled_out = {name: torch.cat([value, value[-1:], value[-1:]]) for name, value in learned.items()}
    again = ev.evaluate(problem, {**params, **spelled_out}, family, Inner(make_rule("lslr", 0.02, steps=4), steps=4),
                        steps=4, tasks=4)
    assert again["steps"] == result["steps"] and "beyond_trained_steps" not in again
    assert "beyond_trained_steps" not in ev.evaluate(problem, params, family, sgd(0.02), steps=4, tasks=4)
