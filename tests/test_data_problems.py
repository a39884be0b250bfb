"""Learned data: per-example weights that clean noisy labels, and distilled examples; on scikit-learn's
digits and a planted problem (small and fast), with the evaluation report and the one-line refusals."""

import json

import pytest
import torch

from distmaml.build import build
from distmaml.commands import cli
from distmaml.config import load_config
from distmaml.meta import Dataset, Inner, Reweighting, make_rule, meta_gradient, meta_parameters
from distmaml.meta.problems.distillation import BASELINE_RATES
from distmaml.models import MLP
from distmaml.run.restore import load_trained
from distmaml.tasks.runs import flip_labels
from conftest import REPO

HYPERCLEAN, DISTILL = REPO / "configs/digits_hyperclean.yaml", REPO / "configs/digits_distill.yaml"
SMALL = ["model.hidden=[8]", "inner.steps=6", "engine.dtype=float64", "train.meta_batch=2"]


@pytest.mark.parametrize("config, extra", [(HYPERCLEAN, []), (DISTILL, ["inner.schedule_blocks=6"])])
def test_gradcheck_finds_every_exact_method_exact(config, extra, tmp_path, capsys):
    code = cli.main(["gradcheck", str(config), *SMALL, *extra, "--tasks", "2", "--json", str(tmp_path / "c.json")])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    report = json.loads((tmp_path / "c.json").read_text())
    assert report["methods"]["second_order"]["exact"] and report["methods"]["second_order"]["rel_error"] <= 1e-6
    assert "truncated" in report["methods"] and "finite_difference" in report["methods"]


@pytest.mark.parametrize("normalised", [True, False])
def test_learned_weights_separate_flipped_from_clean_examples_on_a_planted_problem(normalised):
    """Two well-separated Gaussian classes, 40 % of the training labels flipped: a few dozen outer
    steps of the second-order hypergradient rank the flipped examples below the clean ones.

    The inner rate keeps full-weight training stable (rate x the loss's largest curvature, about
    0.25 x 19 at the start, below 2). Above that, with normalised weights, the flipped examples'
    pull against the clean ones is what keeps the steps from oscillating, and the hypergradient
    rightly raises their weights."""
    generator = torch.Generator().manual_seed(0)

    def points(n):
        y = torch.arange(n) % 2
        x = torch.randn(n, 2, generator=generator, dtype=torch.float64) + 3.0 * (2 * y[:, None] - 1)
        return x, y

    (train_x, clean_y), (val_x, val_y), (test_x, test_y) = points(80), points(40), points(40)
    train_y, flipped = flip_labels(clean_y, 0.4, 2, data_seed=1)
    torch.manual_seed(0)
    problem = Reweighting(MLP(2, [], 2).double(), Dataset(train_x, train_y, val_x, val_y, test_x, test_y),
                          flipped=flipped, normalised=normalised)
    inner = Inner(make_rule("sgd", 0.2), 20)
    phi = meta_parameters(problem, inner)
    optimizer = torch.optim.Adam(phi.values(), lr=0.3)
    tasks = {"seed": torch.arange(4, dtype=torch.int64)}
    for _ in range(30):
        result = meta_gradient(problem, phi, tasks, inner)
        for value, grad in zip(phi.values(), result.grad_sum.values()):
            value.grad = grad / 4
        optimizer.step()
    weights = phi["example_logit"].detach()
    clean, dirty = weights[~flipped], weights[flipped]
    auroc = (clean[:, None] > dirty[None, :]).double().mean().item()  # P(a clean weight > a flipped one)
    assert auroc >= 0.9, auroc


@pytest.mark.parametrize("weighting", ["normalised", "mean"])
def test_the_weighted_loss_is_normalised_by_the_batch_weight_or_averaged(weighting):
    """Normalised, equal weights train like no weights at all, whatever their value; the plain mean
    scales the loss (and so the step) with them. Both against the formula written out here."""
    config = load_config(HYPERCLEAN, [f"hyperclean.weighting={weighting}", "model.hidden=[8]",
                                      "engine.dtype=float64"])
    problem = build(config).problem
    task, weights = {"seed": torch.tensor(3)}, problem.start({}, {"seed": torch.tensor(3)})
    x, y = problem.batch(task, 5)
    per_example = torch.nn.functional.cross_entropy(problem.predict(weights, {}, x), y, reduction="none")
    index = problem.batch_index(task, 5)
    logits = torch.linspace(-3, 3, problem.data.train_x.shape[0], dtype=torch.float64)
    weight = torch.sigmoid(logits[index])
    expected = (weight * per_example).sum() / weight.sum() if weighting == "normalised" else (
        weight * per_example).mean()
    torch.testing.assert_close(problem.inner_loss(weights, {"example_logit": logits}, task, 5), expected,
                               rtol=1e-12, atol=0)
    constant = problem.inner_loss(weights, {"example_logit": torch.full_like(logits, -2.0)}, task, 5)
    plain = problem.training_loss(weights, {}, task, 5)
    if weighting == "normalised":
        torch.testing.assert_close(constant, plain, rtol=1e-12, atol=0)
    else:
        torch.testing.assert_close(constant, torch.sigmoid(torch.tensor(-2.0, dtype=torch.float64)) * plain,
                                   rtol=1e-12, atol=0)


def test_a_hyperclean_checkpoint_from_before_example_weighting_keeps_the_mean_it_trained_with(tmp_path, capsys):
    """A run saved before hyperclean.weighting existed trained on the plain mean: loading it
    builds that loss, and resuming it under today's default (normalised) is refused in one line."""
    common = [str(HYPERCLEAN), f"run.dir={tmp_path}", "inner.steps=5", "eval.at_end=false", "logging.progress=false"]
    assert cli.main(["train", *common, "train.iterations=2", "train.checkpoint_every=2"]) == 0
    path = tmp_path / "checkpoints" / "ckpt_00000002.pt"
    state = torch.load(path, weights_only=True)
    del state["config"]["hyperclean"]["weighting"]
    del state["checksum"]  # a checkpoint from before example_weighting had no checksum either
    torch.save(state, path)
    assert load_trained(path).learner.problem.normalised is False
    capsys.readouterr()
    assert cli.main(["train", *common, "train.iterations=4"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "was trained with hyperclean.weighting = 'mean'" in error, error
    assert cli.main(["train", *common, "train.iterations=4", "hyperclean.weighting=mean"]) == 0


def test_hyperclean_evaluation_reports_the_learned_weights_beside_its_baselines(tmp_path):
    assert cli.main(["train", str(HYPERCLEAN), f"run.dir={tmp_path}", "inner.steps=20", "train.iterations=6",
                     "train.log_every=3", "eval.tasks=2", "eval.steps=20", "logging.progress=false"]) == 0
    assert cli.main(["eval", str(tmp_path), "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    accuracy = result["test_accuracy"]
    assert set(accuracy) == {"learned_weights", "noisy", "noisy_unstopped", "clean_validation_only", "oracle"}
    assert all(0 <= value <= 1 for value in accuracy.values())
    assert accuracy["oracle"] > accuracy["noisy_unstopped"]  # half the labels flipped cost accuracy
    assert 0 <= result["flip_detection"]["precision"] <= 1 and result["flip_detection"]["recall"] > 0


def test_distillation_trains_evaluates_against_its_baselines_and_plots_its_examples(tmp_path):
    assert cli.main(["train", str(DISTILL), f"run.dir={tmp_path}", "train.iterations=30", "train.lr=0.03",
                     "train.log_every=10",
                     "eval.tasks=4", "logging.progress=false"]) == 0
    assert cli.main(["eval", str(tmp_path), "--json", str(tmp_path / "e.json")]) == 0
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["examples_per_class"] == 1
    accuracy = result["test_accuracy"]
    assert set(accuracy) == {"distilled", "random_real", "full", "fixed_init"}
    assert accuracy["fixed_init"]["ci95"] == 0  # one initialisation: no spread
    # The real-data baselines train at their own rate, the grid's best by validation accuracy: the
    # whole training set then teaches a plain MLP well in 30 steps, whatever the distilled steps are.
    assert set(result["baseline_lr"]) == {"random_real", "full"}
    assert all(rate in BASELINE_RATES for rate in result["baseline_lr"].values())
    assert accuracy["full"]["mean"] > 0.8, accuracy["full"]  # far above what the learned steps give it
    # 30 outer steps already make 10 learned images teach more than 10 random real ones.
    assert accuracy["distilled"]["mean"] > accuracy["random_real"]["mean"] + 0.05
    assert cli.main(["plot", str(tmp_path), str(tmp_path / "distilled.png")]) == 0
    assert (tmp_path / "distilled.png").stat().st_size > 10_000


def test_distillation_resumes_bit_for_bit(tmp_path):
    common = [str(DISTILL), "train.log_every=2", "eval.at_end=false", "logging.progress=false",
              "train.checkpoint_every=2"]
    assert cli.main(["train", *common, f"run.dir={tmp_path / 'whole'}", "train.iterations=4"]) == 0
    assert cli.main(["train", *common, f"run.dir={tmp_path / 'parts'}", "train.iterations=2"]) == 0
    assert cli.main(["train", *common, f"run.dir={tmp_path / 'parts'}", "train.iterations=4"]) == 0
    whole, parts = load_trained(tmp_path / "whole").learner.theta, load_trained(tmp_path / "parts").learner.theta
    assert all(torch.equal(whole[name], parts[name]) for name in whole)
    assert not torch.equal(whole["synthetic.x"], load_trained(tmp_path / "whole" / "checkpoints" /
                                                              "ckpt_00000002.pt").learner.theta["synthetic.x"])


@pytest.mark.parametrize("config, overrides, message", [
    (HYPERCLEAN, ["task.args.noise=1.0"], "task.args.noise = 1.0: must be in [0, 1)"),
    (HYPERCLEAN, ["task.args.noise=-0.1"], "task.args.noise = -0.1: must be in [0, 1)"),
    (HYPERCLEAN, ["task.args.validation=0"], "task.args.train = 0.6, task.args.validation = 0: each must be in (0, 1)"),
    (DISTILL, ["distill.per_class=500"], "distill.per_class = 500: must be between 1 and"),
    (DISTILL, ["train.betas=[0.5]"], "train.betas = [0.5]: must be two numbers in [0, 1)"),
])
def test_bad_data_settings_are_one_line(config, overrides, message, tmp_path, capsys):
    code = cli.main(["train", str(config), f"run.dir={tmp_path}", *overrides])
    errors = [line for line in capsys.readouterr().err.splitlines() if " INFO " not in line]
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "checkpoints").exists()


def test_a_distillation_checkpoint_is_not_resumed_as_a_maml_run_nor_the_reverse(tmp_path, capsys):
    assert cli.main(["train", str(DISTILL), f"run.dir={tmp_path / 'distill'}", "train.iterations=2",
                     "eval.at_end=false", "logging.progress=false"]) == 0
    checkpoint = tmp_path / "distill" / "checkpoints" / "ckpt_00000002.pt"
    code = cli.main(["train", str(REPO / "configs/sine_debug.yaml"), f"run.dir={tmp_path / 'maml'}",
                     f"run.resume={checkpoint}"])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "was trained with" in error and "choose another run.dir" in error, error
    assert cli.main(["train", str(REPO / "configs/sine_debug.yaml"), f"run.dir={tmp_path / 'maml'}",
                     "train.iterations=2", "eval.at_end=false", "logging.progress=false"]) == 0
    code = cli.main(["train", str(DISTILL), f"run.dir={tmp_path / 'distill2'}",
                     f"run.resume={tmp_path / 'maml' / 'checkpoints' / 'ckpt_00000002.pt'}"])
    assert code == 2 and "was trained with" in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_missing_scikit_learn_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "sklearn.datasets", None)
    assert cli.main(["train", str(HYPERCLEAN), f"run.dir={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == ("distmaml train: error: task.family = 'digits' needs scikit-learn: pip "
                                               "install -e \".[data]\" (or pip install scikit-learn)")
