"""Learned hyperparameters on MNIST-1D (a subsample, short unrolls): the learning-rate schedule, the
activation function, per-weight decay; gradcheck on each config, the direction of the learning
rate's hypergradient, recomputation, evaluation's report and the one-line refusals."""

import json
import math

import pytest
import torch

from distmaml.build import build
from distmaml.commands import cli
from distmaml.config import load_config
from distmaml.meta import meta_gradient
from conftest import REPO

SMALL = ["task.args.train=200", "inner.steps=12", "engine.dtype=float64", "train.meta_batch=3"]
CONFIGS = {
    "learning_rate": ("configs/mnist1d_lr.yaml", ["inner.schedule_blocks=3", "model.hidden=[8]"]),
    "learning_rate_cross_entropy": ("configs/mnist1d_lr.yaml", ["model.hidden=[8]", "training_run.outer=loss"]),
    "activation": ("configs/mnist1d_activation.yaml", ["inner.truncate=12", "model.hidden=[8]"]),
    "weight_decay": ("configs/mnist1d_weight_decay.yaml", ["model.hidden=[8]", "implicit.cg_steps=500",
                                                          "implicit.cg_tol=0", "implicit.damping=0.5"]),
}


def learner(path, *overrides):
    config = load_config(REPO / path, [*SMALL, *overrides])
    torch.manual_seed(0)
    return config, build(config)


@pytest.mark.parametrize("problem", list(CONFIGS))
def test_gradcheck_finds_every_exact_method_exact(problem, tmp_path, capsys):
    path, overrides = CONFIGS[problem]
    code = cli.main(["gradcheck", str(REPO / path), *SMALL, *overrides, "--tasks", "2", "--json",
                     str(tmp_path / "check.json")])
    out = capsys.readouterr()
    assert code == 0, out.out + out.err
    report = json.loads((tmp_path / "check.json").read_text())
    exact = {name: check for name, check in report["methods"].items() if check["exact"]}
    assert "second_order" in exact and exact["second_order"]["rel_error"] <= 1e-6
    if problem == "activation":  # truncated through every step is the full hypergradient
        assert exact["truncated"]["rel_error"] <= 1e-6
        # A ReLU-free but non-convex net after 12 steps: CG's system is indefinite, it stops early, and
        # gradcheck calls the implicit result approximate instead of failing it.
        assert not report["methods"]["implicit"]["exact"]
    if problem == "weight_decay":  # a 418-weight net: the Hessian is formed densely
        assert exact["implicit"]["reference"] == "dense_ift" and exact["implicit"]["rel_error"] <= 1e-4
    if problem.startswith("learning_rate"):  # the solution of training does not depend on the learning rate
        assert "learned step sizes" in report["skipped"]["implicit"]


@pytest.mark.parametrize("rate, sign", [(1e-3, -1), (5.0, 1)])
def test_the_learning_rate_hypergradient_points_towards_the_optimum(rate, sign):
    """Far below the best rate a larger one lowers the validation loss; far above, a smaller one."""
    config, run = learner("configs/mnist1d_lr.yaml", f"inner.lr={rate}", "inner.steps=20")
    tasks = run.family.sample(0, 0, torch.arange(3))
    gradient = meta_gradient(run.problem, run.theta, tasks, run.inner).grad_sum["inner.lr.log_schedule"]
    assert math.copysign(1, gradient.item()) == sign and abs(gradient.item()) > 1e-4


def test_a_trained_run_s_evaluation_reports_the_learned_rate_its_accuracy_and_a_grid(tmp_path, capsys):
    assert cli.main(["train", str(REPO / "configs/mnist1d_lr.yaml"), f"run.dir={tmp_path}", *SMALL[:3],
                     "model.hidden=[16]", "train.iterations=4", "train.log_every=2", "eval.tasks=3",
                     "eval.steps=12", "logging.progress=false"]) == 0
    assert cli.main(["eval", str(tmp_path), "--json", str(tmp_path / "eval.json"), "--lr-grid", "0.001", "3",
                     "4"]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert 0 <= result["test_accuracy"] <= 1
    assert result["learned"]["learning_rate"] != pytest.approx(0.05)  # trained away from inner.lr
    assert result["grid"]["lrs"] == pytest.approx([0.001, 0.001 * 3000 ** (1 / 3), 0.001 * 3000 ** (2 / 3), 3.0])
    assert len(result["grid"]["test_accuracy"]) == 4 and result["grid"]["best_lr"] in result["grid"]["lrs"]
    assert "validation loss" in capsys.readouterr().out


def test_soft_error_is_one_minus_the_mean_probability_of_the_true_class():
    from distmaml.meta.problems import soft_error

    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 0.0, 0.0], [-3.0, 5.0, 1.0]], dtype=torch.float64)
    labels = torch.tensor([0, 2, 0])
    p = [math.exp(2) / (math.exp(2) + 1 + math.exp(-1)), 1 / 3, math.exp(-3) / (math.exp(-3) + math.exp(5) + math.e)]
    assert soft_error(logits, labels).item() == pytest.approx(1 - sum(p) / 3, rel=1e-12)
    # Bounded where cross-entropy is not: a confident mistake costs at most 1/n.
    confident = torch.tensor([[0.0, 60.0]], dtype=torch.float64)
    assert soft_error(confident, torch.tensor([0])).item() == pytest.approx(1.0)


def test_a_soft_error_grid_is_chosen_by_the_soft_error_and_reports_validation_accuracy(tmp_path):
    assert cli.main(["train", str(REPO / "configs/mnist1d_lr.yaml"), f"run.dir={tmp_path}", *SMALL[:3],
                     "model.hidden=[16]", "training_run.outer=soft_error", "train.iterations=2", "eval.tasks=3",
                     "eval.steps=12", "logging.progress=false"]) == 0
    assert cli.main(["eval", str(tmp_path), "--json", str(tmp_path / "eval.json"), "--lr-grid", "0.001", "3",
                     "5"]) == 0
    grid = json.loads((tmp_path / "eval.json").read_text())["grid"]
    soft = grid["validation_outer_loss"]
    assert len(soft) == len(grid["validation_accuracy"]) == 5 and all(0 <= v <= 1 for v in soft)
    assert soft != grid["validation_loss"] and grid["best_lr"] == grid["lrs"][soft.index(min(soft))]


def test_soft_error_where_it_cannot_apply_is_one_line(tmp_path, capsys):
    code = cli.main(["train", str(REPO / "configs/logistic_weight_decay.yaml"), f"run.dir={tmp_path}",
                     "training_run.outer=soft_error"])
    assert code == 2 and capsys.readouterr().err.strip().endswith(
        "training_run.outer = 'soft_error': soft_error scores a softmax over two or more classes; task.family = "
        "'logistic' has no class logits")
    code = cli.main(["train", str(REPO / "configs/sine_maml.yaml"), f"run.dir={tmp_path / 'maml'}",
                     "training_run.outer=soft_error"])
    assert code == 2 and capsys.readouterr().err.strip().endswith(
        "training_run.outer = 'soft_error': applies to the problems that train a network from scratch (learning_rate, "
        "activation, weight_decay, hyperclean, distill, weighting_net, learning_to_reweight), not to problem.name = 'maml'")


@pytest.mark.parametrize("overrides, flags, message", [
    (["inner.mode=implicit"], [], "mnist1d_lr.yaml: inner.rule = 'schedule': implicit differentiates the solution "
                                  "of the inner problem, which does not depend on learned step sizes"),
    (["inner.schedule_blocks=0"], [], "command line: inner.schedule_blocks = 0: must be an integer >= 1"),
    (["inner.steps=0"], [], "command line: inner.steps = 0: the schedule rule learns the rate of inner steps"),
    (["inner.rule=sgd"], [], "problem.name = 'learning_rate': has nothing to learn"),
    (["inner.lr=0"], [], "command line: inner.lr = 0.0: must be > 0"),
    (["inner.lr=1e400"], [], "command line: inner.lr = '1e400': must be a finite number"),
    (["eval.lr_grid=[0.1, -1]"], [], "command line: eval.lr_grid = [0.1, -1.0]: every rate must be a finite number"),
])
def test_bad_learning_rate_settings_are_one_line(overrides, flags, message, tmp_path, capsys):
    code = cli.main(["train", str(REPO / "configs/mnist1d_lr.yaml"), f"run.dir={tmp_path}", *overrides])
    error = capsys.readouterr().err.strip()
    assert code == 2 and "\n" not in error and message in error, error


def test_an_empty_grid_and_a_missing_data_package_are_one_line(tmp_path, capsys, monkeypatch):
    assert cli.main(["eval", str(tmp_path), "--lr-grid", "0.1", "1", "0"]) == 2
    assert capsys.readouterr().err.strip() == ("distmaml eval: error: --lr-grid 0.1 1 0: COUNT must be a whole number "
                                               ">= 1 (the grid would be empty)")
    for module in ("mnist1d", "mnist1d.data"):  # as if not installed (also where an earlier test imported it)
        monkeypatch.setitem(__import__("sys").modules, module, None)
    code = cli.main(["train", str(REPO / "configs/mnist1d_lr.yaml"), f"run.dir={tmp_path}",
                     f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        "distmaml train: error: task.family = 'mnist1d' needs the mnist1d package: pip install -e \".[data]\" (or pip "
        "install mnist1d)")


def test_the_activation_problem_needs_a_learned_activation(tmp_path, capsys):
    code = cli.main(["train", str(REPO / "configs/mnist1d_activation.yaml"), f"run.dir={tmp_path}",
                     "model.activation=relu"])
    assert code == 2 and capsys.readouterr().err.strip().endswith(
        "model.activation = 'relu': problem.name = activation learns the activation function: it needs "
        "model.activation = learned")


def test_a_learned_activation_trains_and_plot_draws_it_beside_elu_relu_and_swish(tmp_path, capsys):
    assert cli.main(["train", str(REPO / "configs/mnist1d_activation.yaml"), f"run.dir={tmp_path}", *SMALL[:3],
                     "inner.truncate=6", "model.hidden=[16]", "train.iterations=3", "train.lr=0.1", "eval.tasks=2",
                     "eval.steps=12", "logging.progress=false"]) == 0
    from distmaml.run.restore import load_trained

    trained = load_trained(tmp_path)
    assert trained.learner.theta["activation.offset.2.weight"].abs().max() > 0  # the offset moved from zero
    assert cli.main(["plot", str(tmp_path), str(tmp_path / "activation.png")]) == 0
    from PIL import Image

    with Image.open(tmp_path / "activation.png") as image:
        assert image.size[0] > 800 and image.size[1] > 300
