"""Inner-loop checkpointing: the segment planner, exactness of recomputed meta-gradients, its guards."""

from __future__ import annotations

import dataclasses
import functools
import itertools
from pathlib import Path

import pytest
import torch
from torch import nn

from distmaml.config import ConfigError, InnerConfig, load_config
from distmaml.meta import (CHECKPOINTS, LEARNED, MAML, RULES, Inner, TaskBatch, make_method, make_rule, meta_gradient,
                           meta_gradient_loop, meta_loss, plan_segments, unroll)
from distmaml.meta.checkpointing import check_recomputable
from distmaml.models import MLP, ResNet12
from distmaml.tasks.omniglot import cross_entropy
from distmaml.tasks.sine import SineTasks

REPO = Path(__file__).resolve().parents[2]

INNER_LR = 0.05
SETTINGS = [("every_step", None), ("segments", 3), ("auto", None)]
# Each rule with settings under which a 30-step unroll of the sine MLP stays finite.
RULE_SETTINGS = {"sgd": {}, "meta_sgd": {}, "lslr": {}, "schedule": {"blocks": 2}, "momentum": {"momentum": 0.8},
                 "adam": {"lr": 0.02, "betas": (0.8, 0.9)}}


def spec(steps: int, mode: str = "second_order", truncate: int | None = None, checkpoint: str = "none",
         checkpoint_segment: int | None = None, rule: str = "sgd") -> Inner:
    settings = dict(RULE_SETTINGS[rule])
    lr = settings.pop("lr", INNER_LR)
    method = make_method(mode) if truncate is None else make_method(mode, truncate=truncate)
    # A rule is made for at least as many steps as the schedule has blocks (2); K = 1 runs fewer.
    return Inner(make_rule(rule, lr, max(steps, 2), **settings), steps, method, checkpoint=checkpoint,
                 checkpoint_segment=checkpoint_segment)


def make_problem(build_model, tasks: int = 3, points: int = 5):
    torch.manual_seed(0)
    model = build_model().double()
    params = {name: value.detach().clone().requires_grad_() for name, value in model.named_parameters()}
    batch = SineTasks(support=points, query=points, dtype=torch.float64).sample(0, 0, torch.arange(tasks))
    return MAML(model), params, batch


def with_learned(params, inner: Inner):
    """phi: the weights and the rule's learned step sizes, jittered so that each one matters."""
    generator = torch.Generator().manual_seed(1)
    learned = inner.rule.parameters({name: value.detach() for name, value in params.items()})
    return {**params, **{name: (value * (1 + 0.3 * torch.rand(value.shape, generator=generator, dtype=value.dtype)))
                         .requires_grad_() for name, value in learned.items()}}


@functools.lru_cache(maxsize=None)
def unchecked(rule: str, inner_steps: int, mode: str, truncate: int | None):
    """The checkpoint='none' meta-gradient, shared by the tests that compare against it."""
    problem, params, batch = make_problem(lambda: MLP(1, (16, 16), 1))
    inner = spec(inner_steps, mode, truncate, rule=rule)
    return meta_gradient(problem, with_learned(params, inner), batch, inner)


# ---------------------------------------------------------------------------------------------
# Segment planner


def test_plan_of_each_setting():
    assert plan_segments(5, 5, "none") == [(0, 5, False)]
    assert plan_segments(3, 3, "every_step") == [(0, 1, True), (1, 2, True), (2, 3, True)]
    assert plan_segments(7, 7, "segments", 3) == [(0, 3, True), (3, 6, True), (6, 7, True)]
    assert plan_segments(30, 30, "auto") == [(start, start + 5, True) for start in range(0, 30, 5)]  # sqrt(30) ~ 5
    assert plan_segments(100, 100, "auto") == [(start, start + 10, True) for start in range(0, 100, 10)]


def test_plan_checkpoints_only_the_differentiated_tail():
    # Truncated mode: the 6 first-order steps keep no graph, so they stay one plain segment.
    assert plan_segments(10, 4, "segments", 3) == [(0, 6, False), (6, 9, True), (9, 10, True)]
    assert plan_segments(10, 4, "none") == [(0, 6, False), (6, 10, False)]
    assert plan_segments(10, 4, "auto") == [(0, 6, False), (6, 8, True), (8, 10, True)]
    # First order differentiates no step: checkpointing is a no-op.
    assert plan_segments(10, 0, "every_step") == [(0, 10, False)]


def test_plan_edge_cases():
    assert plan_segments(0, 0, "auto") == []
    assert plan_segments(1, 1, "auto") == [(0, 1, True)]
    assert plan_segments(4, 4, "segments", 10) == [(0, 4, True)]  # a segment longer than the unroll
    assert plan_segments(2, 2, "none", 1) == [(0, 2, False)]  # a length without segments is ignored


@pytest.mark.parametrize("inner_steps", [0, 1, 2, 7, 16])
def test_plan_covers_every_step_once_in_order(inner_steps):
    for differentiated, (checkpoint, segment) in itertools.product(
            range(inner_steps + 1), [("none", None), ("every_step", None), ("segments", 1), ("segments", 4),
                                     ("auto", None)]):
        plan = plan_segments(inner_steps, differentiated, checkpoint, segment)
        assert [step for start, end, _ in plan for step in range(start, end)] == list(range(inner_steps))
        assert all(end > start for start, end, _ in plan)
        first_differentiated = inner_steps - differentiated
        for start, end, checkpointed in plan:
            assert checkpointed == (checkpoint != "none" and start >= first_differentiated)
            assert start >= first_differentiated or end <= first_differentiated  # no segment straddles


@pytest.mark.parametrize("args, message", [
    ((5, 5, "sometimes"), "checkpoint must be one of none, every_step, segments, auto, got 'sometimes'"),
    ((5, 5, "segments"), "checkpoint='segments' needs a segment length"),
    ((5, 5, "segments", 0), "checkpoint segment length must be >= 1, got 0"),
    ((5, 6, "auto"), "differentiated steps must be between 0 and inner_steps (5), got 6"),
])
def test_plan_rejects_bad_arguments(args, message):
    with pytest.raises(ValueError) as error:
        plan_segments(*args)
    assert str(error.value) == message


# ---------------------------------------------------------------------------------------------
# Exactness: recomputation changes memory, never the answer


UNROLLS = [(1, "second_order", None), (7, "second_order", None), (30, "second_order", None), (7, "truncated", 5),
           (7, "first_order", None)]


@pytest.mark.parametrize("checkpoint, segment", SETTINGS)
@pytest.mark.parametrize("rule, inner_steps, mode, truncate",
                         # A long truncated unroll (segments of a tail after a plain head) for plain SGD only:
                         # the 7-step one covers every rule's state crossing from that head into the tail.
                         [(rule, *unroll) for rule in RULES for unroll in UNROLLS] + [("sgd", 30, "truncated", 5)])
def test_checkpointed_meta_gradient_equals_unchecked(rule, inner_steps, mode, truncate, checkpoint, segment):
    """The one test of "recomputed = stored, bit for bit": every rule, every method that keeps a graph
    (first order keeps none, so its plan is a no-op), every segmentation. Learned step sizes,
    momentum buffers and Adam moments are inputs of the recomputed segments: none of their gradient
    may be dropped."""
    problem, params, batch = make_problem(lambda: MLP(1, (16, 16), 1))
    expected = unchecked(rule, inner_steps, mode, truncate)
    inner = spec(inner_steps, mode, truncate, checkpoint, segment, rule)
    theta = with_learned(params, inner)
    got = meta_gradient(problem, theta, batch, inner)
    assert list(got.grad_sum) == list(theta)
    assert max((got.grad_sum[name] - expected.grad_sum[name]).abs().max().item() for name in theta) <= 1e-6
    # Bitwise (float64, CPU, torch 2.13): the recomputation repeats the same kernels on the same
    # inputs, and the weights reach each segment through a single tensor, so no gradient sum is
    # regrouped. Inputs shared by all segments are (see the support-set test below), as would be
    # nondeterministic kernels (some CUDA atomics).
    for name in theta:
        assert torch.equal(got.grad_sum[name], expected.grad_sum[name]), name
    assert torch.equal(got.task_losses, expected.task_losses)
    assert torch.isfinite(expected.task_losses).all()
    assert expected.grad_sum["net.0.weight"].abs().sum() > 0  # a real gradient, not two zeros
    # ...and so are the learned step sizes' (every one of them reaches the objective).
    assert all(expected.grad_sum[name].abs().max() > 0 for name in theta if name.startswith(LEARNED))


@pytest.mark.parametrize("config, overrides", [
    # phi in the inner loss (a per-weight decay), in the step (a five-block learning-rate schedule), in the
    # data (distilled examples): each from a fresh initialisation per task, not from phi.
    ("configs/logistic_weight_decay.yaml", ["inner.lr=4.0"]),
    ("configs/mnist1d_lr.yaml", ["task.args.train=200", "inner.schedule_blocks=5", "inner.lr=0.3",
                                 "model.hidden=[8]"]),
    ("configs/digits_distill.yaml", ["inner.schedule_blocks=50", "model.hidden=[16]"]),
])
def test_every_problem_s_recomputed_fifty_step_unroll_gives_the_stored_hypergradient_bit_for_bit(config, overrides):
    """The problems beyond MAML, through the trainer's own builder: the same property as above."""
    from distmaml.build import build

    torch.manual_seed(0)
    learner = build(load_config(REPO / config, [*overrides, "inner.steps=50", "engine.dtype=float64"]))
    tasks = learner.family.sample(0, 0, torch.arange(3))
    rule, method = learner.inner.rule, learner.inner.method
    stored = meta_gradient(learner.problem, learner.theta, tasks, Inner(rule, 50, method))
    assert all(stored.grad_sum[name].abs().max() > 0 for name in learner.theta)  # every meta-parameter is reached
    for checkpoint, segment in SETTINGS:
        recomputed = meta_gradient(learner.problem, learner.theta, tasks, Inner(rule, 50, method, checkpoint, segment))
        for name in learner.theta:
            assert torch.equal(stored.grad_sum[name], recomputed.grad_sum[name]), (checkpoint, name)


def test_checkpointed_resnet12_unroll_is_bit_exact():
    """Convolutions and batch-statistics normalisation (BatchStatNorm2d) recompute exactly too."""
    torch.manual_seed(0)
    model = ResNet12(3, (4, 4, 6, 6)).double()
    params = {name: value.detach().clone().requires_grad_() for name, value in model.named_parameters()}
    generator = torch.Generator().manual_seed(0)

    def points(count, tasks=2, ways=3):
        x = torch.rand(tasks, ways * count, 3, 16, 16, generator=generator, dtype=torch.float64)
        return x, torch.arange(ways).repeat_interleave(count).expand(tasks, -1).contiguous()

    batch = TaskBatch(*points(1), *points(2))
    problem = MAML(model, cross_entropy)
    stored = meta_gradient(problem, params, batch, Inner(make_rule("sgd", 0.3), 3))
    assert stored.grad_sum["features.0.body.0.weight"].abs().sum() > 0
    for checkpoint in ("every_step", "auto"):
        recomputed = meta_gradient(problem, params, batch, Inner(make_rule("sgd", 0.3), 3, checkpoint=checkpoint))
        for key, value in stored.grad_sum.items():
            assert torch.equal(recomputed.grad_sum[key], value), (checkpoint, key)


def test_checkpointed_meta_gradient_matches_the_per_task_reference():
    problem, params, batch = make_problem(lambda: MLP(1, (16, 16), 1))
    got = meta_gradient(problem, params, batch, spec(7, "truncated", 5, "segments", 2))
    expected = meta_gradient_loop(problem, params, batch, spec(7, "truncated", 5))
    for name in params:
        torch.testing.assert_close(got.grad_sum[name], expected.grad_sum[name], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.task_losses, expected.task_losses, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("checkpoint, segment, extra_forwards", [
    ("none", None, 0), ("every_step", None, 7), ("segments", 3, 7), ("auto", None, 7),
])
def test_backward_recomputes_the_checkpointed_steps(checkpoint, segment, extra_forwards):
    # Equal gradients alone would also pass if checkpointing were silently ignored.
    problem, params, batch = make_problem(lambda: MLP(1, (8,), 1))
    forwards = []
    problem.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    losses = meta_loss(problem, params, batch, spec(7, checkpoint=checkpoint, checkpoint_segment=segment))[0]
    assert len(forwards) == 7 + 1  # one vmapped forward per inner step, one for the query loss
    torch.autograd.grad(losses.sum(), list(params.values()))
    assert len(forwards) == 7 + 1 + extra_forwards


def test_truncated_mode_recomputes_only_its_tail():
    problem, params, batch = make_problem(lambda: MLP(1, (8,), 1))
    forwards = []
    problem.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    losses = meta_loss(problem, params, batch, spec(7, "truncated", 2, "every_step"))[0]
    torch.autograd.grad(losses.sum(), list(params.values()))
    assert len(forwards) == 7 + 1 + 2


def test_gradient_with_respect_to_the_support_set_survives_recomputation():
    problem, params, batch = make_problem(lambda: MLP(1, (8,), 1))

    def support_gradient(checkpoint):
        tasks = batch._replace(support_x=batch.support_x.clone().requires_grad_())
        adapted = unroll(problem, params, tasks, spec(4, checkpoint=checkpoint)).weights
        return torch.autograd.grad(sum(value.sum() for value in adapted.values()), tasks.support_x)[0]

    expected = support_gradient("none")
    assert expected.abs().sum() > 0
    # Not bitwise: the support set feeds every step, and once each segment returns its share of the
    # gradient separately, the K shares are summed in a different order (differences ~1e-17).
    torch.testing.assert_close(support_gradient("every_step"), expected, rtol=1e-12, atol=1e-15)


def test_differentiating_the_meta_gradient_through_a_checkpoint_is_an_error_not_a_wrong_answer():
    problem, params, batch = make_problem(lambda: MLP(1, (8,), 1))
    losses = meta_loss(problem, params, batch, spec(3, checkpoint="auto"))[0]
    with pytest.raises(RuntimeError, match=r"cannot differentiate the meta-gradient again \(create_graph=True\)"):
        torch.autograd.grad(losses.sum(), list(params.values()), create_graph=True)


# ---------------------------------------------------------------------------------------------
# Normalisation layers: recomputation must not update running statistics twice


def batchnorm_net(track_running_stats: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(1, 8), nn.BatchNorm1d(8, track_running_stats=track_running_stats), nn.ReLU(),
                         nn.Linear(8, 1))


def test_batch_statistics_batchnorm_is_checkpointed_exactly():
    problem, params, batch = make_problem(lambda: batchnorm_net(track_running_stats=False))
    assert list(problem.model.buffers()) == []  # nothing that a recomputation could update
    expected = meta_gradient(problem, params, batch, spec(5))
    got = meta_gradient(problem, params, batch, spec(5, checkpoint="segments", checkpoint_segment=2))
    for name in params:
        assert torch.equal(got.grad_sum[name], expected.grad_sum[name]), name


def test_running_statistics_are_refused_before_any_step():
    problem, params, batch = make_problem(lambda: batchnorm_net(track_running_stats=True))
    with pytest.raises(ValueError, match=r"running statistics of 1 \(BatchNorm1d\) twice: build it with "
                                         r"track_running_stats=False"):
        meta_gradient(problem, params, batch, spec(3, checkpoint="every_step"))
    assert problem.model[1].num_batches_tracked.item() == 0
    check_recomputable(problem.model.eval())  # evaluation mode reads the statistics but never updates them


# ---------------------------------------------------------------------------------------------
# Configuration


def test_config_offers_exactly_the_engine_settings():
    # config.py may not import torch-side modules, so the two lists are kept equal by this test.
    spec = next(f for f in dataclasses.fields(InnerConfig) if f.name == "checkpoint")
    assert spec.metadata["choices"] == CHECKPOINTS
    assert InnerConfig().checkpoint == "none"


@pytest.mark.parametrize("overrides, message", [
    (["inner.checkpoint=segments"],
     "command line: inner.checkpoint_segment = None: inner.checkpoint=segments needs a segment length"),
    (["inner.checkpoint=segments", "inner.checkpoint_segment=0"],
     "command line: inner.checkpoint_segment = 0: must be >= 1"),
    (["inner.checkpoint_segment=-2"], "command line: inner.checkpoint_segment = -2: must be >= 1"),
    (["inner.checkpoint=sqrt"],
     "command line: inner.checkpoint = 'sqrt': must be one of none, every_step, segments, auto"),
])
def test_bad_checkpoint_settings_are_one_line_config_errors(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config(None, overrides)
    assert str(error.value) == message


def test_missing_segment_length_is_blamed_on_the_file_that_asked_for_segments(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("inner:\n  steps: 20\n  checkpoint: segments\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert str(error.value) == (f"{path}: inner.checkpoint_segment = None: "
                                "inner.checkpoint=segments needs a segment length")
    config = load_config(path, ["inner.checkpoint_segment=4"])
    assert (config.inner.checkpoint, config.inner.checkpoint_segment) == ("segments", 4)
