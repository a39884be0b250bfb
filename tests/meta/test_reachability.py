"""A run that cannot learn says so: meta-parameters the hypergradient does not reach, a meta-gradient
that runs away, settings that cannot work with the method, and refusals that leave nothing on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distmaml.build import build, build_method
from distmaml.commands import cli
from distmaml.commands.train import _sharpness_warning
from distmaml.config import load_config
from distmaml.engine import dist
from distmaml.engine.step import MetaStep, Unreached, make_optimizer
from distmaml.meta.online import run_group
from distmaml.meta.reachability import reached_flags, unreached

REPO = Path(__file__).resolve().parents[2]
LOGISTIC = REPO / "configs/logistic_weight_decay.yaml"
OMNIGLOT = REPO.parent / "shared/data/omniglot"

MINE = '''
import torch
from distmaml.meta import WeightDecay
from distmaml.meta.problems import binary_accuracy, binary_cross_entropy

class Detached(WeightDecay):  # the outer loss cut from phi
    def outer_loss(self, weights, phi, task):
        return super().outer_loss(weights, phi, task).detach()

class Ignoring(WeightDecay):  # the inner loss does not read phi
    def inner_loss(self, weights, phi, task, step):
        return super().inner_loss(weights, {k: v.detach() for k, v in phi.items()}, task, step)

class Gated(WeightDecay):  # phi["gate"] is reached until one outer step pushes it below 0
    def meta_parameters(self):
        return {**super().meta_parameters(), "gate": torch.tensor(0.5)}

    def outer_loss(self, weights, phi, task):
        return super().outer_loss(weights, phi, task) + torch.relu(phi["gate"])

def build(kind):
    def make(model, family):
        return kind(model, family.dataset, binary_cross_entropy, binary_accuracy)
    return make

detached, ignoring, gated = build(Detached), build(Ignoring), build(Gated)
'''

SMALL = ["inner.steps=3", "train.iterations=2", "train.meta_batch=2", "eval.tasks=2", "eval.steps=3",
         "logging.progress=false"]


def _train(tmp_path, capsys, *overrides, config=LOGISTIC):
    # A run directory two levels below what exists: a refused run must take back both.
    code = cli.main(["train", str(config), f"run.dir={tmp_path / 'new' / 'run'}", *SMALL, *overrides])
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if " INFO " not in line]


def test_the_flags_name_every_tensor_that_is_zero_everywhere():
    grads = [torch.zeros(3), torch.tensor([0.0, 1e-30]), torch.tensor([float("nan")]), torch.zeros(2, 2)]
    flags = reached_flags(grads)
    assert flags.tolist() == [False, True, True, False]
    assert unreached(["a", "b", "c", "head.w"], flags) == ["a", "head.w"]
    assert unreached(["a", "b", "c", "head.w"], flags, allowed=["head"]) == ["a"]


@pytest.mark.parametrize("overrides, names", [
    (["problem.name=mine.py:ignoring", "inner.mode=second_order"], "log_decay.net.0.weight"),
    # the binary family: distilled examples whose labels never move the one output
    (["problem.name=distill", "inner.mode=second_order"], "synthetic.x, synthetic.label_logits"),
    (["inner.steps=0", "inner.mode=second_order"], "log_decay.net.0.weight"),
])
def test_meta_parameters_the_hypergradient_never_reaches_stop_the_run_before_its_first_step(
        overrides, names, tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.py").write_text(MINE)
    monkeypatch.chdir(tmp_path)
    code, errors = _train(tmp_path, capsys, *overrides)
    assert code == 2 and len(errors) == 1, errors
    assert f"the first meta-batch's hypergradient is exactly 0 in every element of {names} " in errors[0]
    assert "train.allow_unreached" in errors[0]
    if "inner.steps=0" in overrides:
        assert "command line: inner.steps = 0:" in errors[0] and "there are none" in errors[0]
    assert not (tmp_path / "new").exists()  # the refused run left nothing on disk


@pytest.mark.parametrize("overrides", [["inner.steps=0"], ["hyperclean.weighting=mean", "hyperclean.init=1e6"],
                                       ["hyperclean.weighting=mean", "hyperclean.init=-200"]])
def test_hyper_cleaning_without_steps_or_with_saturated_weights_stops_before_its_first_step(overrides, tmp_path,
                                                                                            capsys):
    pytest.importorskip("sklearn")
    code, errors = _train(tmp_path, capsys, *overrides, config=REPO / "configs/digits_hyperclean.yaml")
    assert code == 2 and len(errors) == 1, errors
    assert "the first meta-batch's hypergradient is exactly 0 in every element of example_logit " in errors[0]
    assert ("there are none" in errors[0]) == ("inner.steps=0" in overrides)
    assert not (tmp_path / "new").exists()


@pytest.mark.parametrize("mode", ["second_order", "implicit", "finite_difference"])
def test_a_detached_outer_loss_is_named_as_such_whatever_the_method(mode, tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.py").write_text(MINE)
    monkeypatch.chdir(tmp_path)
    code, errors = _train(tmp_path, capsys, "problem.name=mine.py:detached", f"inner.mode={mode}")
    assert code == 2 and len(errors) == 1, errors
    assert "Detached: outer_loss is detached from the graph" in errors[0]
    assert not (tmp_path / "new").exists()


def test_gradcheck_refuses_an_unreached_phi_in_the_trainer_s_words(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.py").write_text(MINE)
    monkeypatch.chdir(tmp_path)
    settings = ["problem.name=mine.py:ignoring", "inner.mode=second_order", "inner.steps=3"]
    assert cli.main(["gradcheck", str(LOGISTIC), *settings]) == 2
    checked = capsys.readouterr().err.strip().removeprefix("distmaml gradcheck: error: ")
    code, errors = _train(tmp_path, capsys, *settings)
    assert code == 2 and errors == [f"distmaml train: error: {checked}"]


def test_allowed_tensors_train_and_a_tensor_unreached_for_a_window_is_a_warning(tmp_path, monkeypatch, capsys):
    (tmp_path / "mine.py").write_text(MINE)
    monkeypatch.chdir(tmp_path)
    # Adam's first step (rate 1) takes the gate from 0.5 to -0.5, where relu has no slope.
    code, errors = _train(tmp_path, capsys, "problem.name=mine.py:gated", "inner.mode=second_order",
                          "train.iterations=4", "train.log_every=2", "train.lr=1")
    assert code == 0, errors
    warned = [line for line in errors if "WARNING" in line]
    assert len(warned) == 1 and "the meta-gradient of gate was exactly 0 at every iteration from 3 to 4" in warned[0]
    (tmp_path / "new").rename(tmp_path / "first")
    code, errors = _train(tmp_path, capsys, "problem.name=mine.py:ignoring", "inner.mode=second_order",
                          "train.allow_unreached=[log_decay]")
    assert code == 0 and not [line for line in errors if "WARNING" in line], errors


@pytest.mark.parametrize("overrides, message", [
    # first order differentiates no inner step: a decay reaches the outer loss only through them
    (["inner.mode=first_order"], "command line: inner.mode = 'first_order': differentiates no inner step, and "
                                 "WeightDecay's log_decay.net.0.weight reaches the outer loss only through the inner "
                                 "steps"),
    (["inner.mode=truncated", "inner.truncate=0"], "command line: inner.mode = 'truncated': differentiates no inner"),
    (["inner.steps=0"], "command line: inner.steps = 0: implicit differentiates the solution the inner steps reach"),
    # MAML++'s annealing starts first order, which a decay cannot be trained by either
    (["inner.mode=second_order", "inner.first_order_iterations=2"], "inner.first_order_iterations = 2: starts "
     "training with inner.mode = first_order, which differentiates no inner step"),
    # a resume that finds nothing to resume from, in a directory the run would have created
    (["run.resume=true"], "run.resume = true: no checkpoint in"),
    # a default the config file does not set is not blamed on the file
    (["inner.rule=momentum", "inner.momentum=0.9"], "logistic_weight_decay.yaml, with implicit.inner_safeguard at its "
                                                    "default: implicit.inner_safeguard = True: caps plain SGD"),
])
def test_a_method_that_cannot_work_is_refused_before_the_run_directory_exists(overrides, message, tmp_path, capsys):
    code, errors = _train(tmp_path, capsys, *overrides)
    assert code == 2 and len(errors) == 1 and message in errors[0], errors
    assert not (tmp_path / "new").exists()


def test_a_finite_difference_step_far_outside_the_weights_scale_is_a_warning(tmp_path, capsys):
    code, errors = _train(tmp_path, capsys, "inner.mode=finite_difference", "finite_difference.eps=1e6")
    warned = [line for line in errors if "WARNING" in line]
    assert code == 0 and len(warned) == 1, errors
    assert "finite_difference.eps = 1e+06 is" in warned[0] and "times the norm of the inner weights" in warned[0]


def test_a_runaway_neumann_series_stops_the_run_on_the_gradient_norm_and_names_its_alpha(tmp_path, capsys):
    # The series diverges once the learned decays sharpen the inner Hessian past 2 / alpha: the
    # meta-gradient's norm grows by orders of magnitude per iteration long before the meta-loss does.
    code, errors = _train(tmp_path, capsys, "inner.mode=neumann", "neumann.alpha=4.9", "neumann.terms=50",
                          "implicit.inner_safeguard=false", "inner.steps=30", "train.lr=0.5",
                          "train.iterations=40", "train.log_every=2", "train.checkpoint_every=2")
    assert code == 1 and len(errors) == 1, errors
    assert "the meta-gradient's norm" in errors[0] and "above train.max_grad_norm_factor = 1000" in errors[0]
    assert "neumann.alpha = 4.9 is too large" in errors[0]
    summary = json.loads((tmp_path / "new/run/summary.json").read_text())
    diverged_at = summary["diverged_at"]
    good = summary["last_good_checkpoint"]
    assert good is not None and int(Path(good).stem.split("_")[-1]) < diverged_at
    assert sorted(path.name for path in (tmp_path / "new/run/checkpoints").iterdir())[-1] == Path(good).name


def test_an_implicit_hypergradient_that_cg_left_at_zero_says_why(tmp_path, capsys):
    # Three steps of MNIST-1D's MLP leave its weights where the Hessian has no positive curvature
    # along the outer gradient: CG takes no step, and the hypergradient is exactly 0.
    pytest.importorskip("mnist1d")
    code, errors = _train(tmp_path, capsys, "train.meta_batch=1", config=REPO / "configs/mnist1d_weight_decay.yaml")
    assert code == 2 and len(errors) == 1, errors
    assert "conjugate gradient found no positive curvature along the outer gradient" in errors[0]


def test_the_curvature_warning_says_what_to_do():
    config = load_config(REPO / "configs/sine_maml.yaml", [])
    learner = build(config)
    line = _sharpness_warning(config, learner, {"sharpness": 2046.0, "iteration": 45000})
    assert "curvature 2046" in line and "above 2 / inner.lr = 2000" in line
    assert "train with them (inner.steps) or with a smaller inner.lr" in line
    assert _sharpness_warning(config, learner, {"sharpness": 1999.0, "iteration": 1}) is None


def _configs() -> list[Path]:
    return sorted((REPO / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", _configs(), ids=lambda path: path.stem)
def test_no_shipped_config_is_refused_as_unreachable(path, omniglot_cache, tmp_path):
    config = load_config(path, [])
    overrides = ["train.meta_batch=1", f"run.dir={tmp_path}"]
    if config.task.family == "image_folder":
        pytest.skip("no image-folder data set on this machine")  # read from data.root, which the configs leave to you
    if config.task.family == "omniglot":
        if not OMNIGLOT.is_dir():
            pytest.skip(f"no Omniglot at {OMNIGLOT}")
        overrides += [f"data.root={OMNIGLOT}", f"data.cache_dir={omniglot_cache(OMNIGLOT)}"]
    if config.online.runs:  # one persistent run (PES: one pair), its own unroll (online, inner.steps is the unroll)
        runs = run_group(build_method(config))
        overrides += [f"online.runs={runs}", f"train.meta_batch={runs}"]
    else:
        # An implicit method needs inner steps that near a minimum: a handful is too few for MNIST-1D's MLP.
        steps = max(min(config.inner.steps, 10), config.inner.schedule_blocks)
        overrides += [f"inner.steps={steps}", f"inner.truncate={min(config.inner.truncate, steps)}"]
    if config.inner.checkpoint_segment:
        overrides.append("inner.checkpoint_segment=1")
    config = load_config(path, overrides)
    torch.manual_seed(config.train.seed)
    learner = build(config)
    step = MetaStep(learner, make_optimizer(learner.theta.values(), config.train.lr, torch.device("cpu")), config,
                    dist.Context())
    step.check_reachable = True
    try:
        step(0)
    except Unreached as err:
        pytest.fail(f"{path.name}: {err.names} unreached on the first meta-batch")
    assert not step.check_reachable
