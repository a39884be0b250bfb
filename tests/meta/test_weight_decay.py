"""The general bi-level core on a problem with a closed form: learned per-feature weight decay of a
logistic regression whose tasks are random initialisations (configs/logistic_weight_decay.yaml)."""

import json

import pytest
import torch

from distmaml.commands import cli
from distmaml.meta import (MAML, FiniteDifference, ImplicitCG, Inner, MethodError, Neumann, SecondOrder, Truncated,
                           WeightDecay,
                           check_problem, make_rule, meta_gradient, meta_gradient_loop, meta_parameters, task_at,
                           unroll)
from distmaml.meta.gradcheck import dense_ift, gradcheck
from distmaml.meta.init import fresh_weights, init_bounds
from distmaml.meta.problems import binary_accuracy, binary_cross_entropy
from distmaml.models import MLP
from distmaml.rng import STREAM_TRAIN
from distmaml.tasks.logistic import logistic_runs
from distmaml.tasks.sine import SineTasks
from conftest import REPO, run_cli

CONFIG = REPO / "configs/logistic_weight_decay.yaml"
LR = 4.0  # below 2 / (largest curvature, about 0.25): fast, stable full-batch descent


@pytest.fixture(scope="module")
def bed():
    family = logistic_runs(seed=0, device="cpu", dtype=torch.float64)
    torch.manual_seed(0)
    model = MLP(20, [], 1).double()
    problem = WeightDecay(model, family.dataset, binary_cross_entropy, binary_accuracy, per="input", initial=0.01)
    phi = meta_parameters(problem, Inner(make_rule("sgd", LR), 1))
    # Unequal decays, so that each feature's hypergradient differs.
    with torch.no_grad():
        phi["log_decay.net.0.weight"].add_(torch.linspace(-1.0, 1.0, 20, dtype=torch.float64))
    tasks = family.sample(STREAM_TRAIN, 0, torch.arange(3))
    return problem, phi, tasks


def flat(grads):
    return torch.cat([g.reshape(-1) for g in grads.values()])


def relative(a, b):
    return ((flat(a) - flat(b)).norm() / flat(b).norm()).item()


def test_the_problem_follows_its_protocol_and_each_task_starts_from_its_own_initialisation(bed):
    problem, phi, tasks = bed
    check_problem(problem, phi, task_at(tasks, 0))
    starts = unroll(problem, phi, tasks, Inner(make_rule("sgd", LR), 0)).weights["net.0.weight"]
    assert starts.shape == (3, 1, 20) and not torch.equal(starts[0], starts[1])
    assert starts.abs().max() <= 1 / 20 ** 0.5  # PyTorch's default bound 1/sqrt(fan_in)
    # A task's initialisation is a function of its key alone: shard = slice.
    alone = unroll(problem, phi, {"seed": tasks["seed"][2:]}, Inner(make_rule("sgd", LR), 0)).weights
    assert torch.equal(alone["net.0.weight"][0], starts[2])


def test_fresh_weights_are_uniform_in_the_default_bounds():
    template = {"w": torch.zeros(64, 256, dtype=torch.float64), "b": torch.zeros(64, dtype=torch.float64)}
    template = {"layer.weight": template["w"], "layer.bias": template["b"], "norm.weight": torch.ones(3)}
    bounds = init_bounds(template)
    assert bounds == {"layer.weight": 1 / 16, "layer.bias": 1 / 16, "norm.weight": None}
    drawn = fresh_weights(template, torch.tensor(12345))
    assert torch.equal(drawn["norm.weight"], torch.ones(3))
    values = drawn["layer.weight"].flatten()
    assert values.abs().max() < 1 / 16 and abs(values.mean().item()) < 0.002
    assert values.var().item() == pytest.approx((1 / 16) ** 2 / 3, rel=0.03)  # variance of U(-b, b)


@pytest.mark.parametrize("steps", [1, 20])
def test_unrolled_equals_finite_differences_of_the_unrolled_objective(bed, steps):
    problem, phi, tasks = bed
    inner = Inner(make_rule("sgd", LR), steps, SecondOrder())
    report = gradcheck(problem, phi, tasks, inner, {"second_order": SecondOrder()})
    assert report["second_order"].reference == "finite_difference" and report["second_order"].exact
    assert report["second_order"].rel_error <= 1e-6


def test_truncation_identities_hold_on_a_problem_whose_phi_is_in_the_inner_loss(bed):
    problem, phi, tasks = bed
    rule = make_rule("sgd", LR)
    full = meta_gradient(problem, phi, tasks, Inner(rule, 6, SecondOrder())).grad_sum
    assert flat(meta_gradient(problem, phi, tasks, Inner(rule, 6, Truncated(6))).grad_sum).equal(flat(full))
    # The decay acts through the inner steps only: a method that differentiates none of them would
    # return 0 by construction, and is refused (T = 0 as first order is).
    for method in ("first_order", Truncated(0)):
        with pytest.raises(MethodError, match="reaches the outer loss only through the inner steps"):
            meta_gradient(problem, phi, tasks, Inner(rule, 6, method))


@pytest.mark.parametrize("method", [SecondOrder(), ImplicitCG(cg_steps=25, cg_tol=0.0), Neumann(terms=40, alpha=4.0),
                                    FiniteDifference(1e-3)])
def test_batched_engine_equals_the_per_task_reference(bed, method):
    problem, phi, tasks = bed
    inner = Inner(make_rule("sgd", LR), 8, method)
    batched, looped = meta_gradient(problem, phi, tasks, inner), meta_gradient_loop(problem, phi, tasks, inner)
    assert relative(batched.grad_sum, looped.grad_sum) < 1e-10
    torch.testing.assert_close(batched.task_losses, looped.task_losses, rtol=1e-12, atol=0)


def test_implicit_methods_approach_the_exact_hypergradient_as_the_inner_loop_and_the_solver_converge(bed):
    problem, phi, tasks = bed
    rule = make_rule("sgd", LR)
    solution = unroll(problem, phi, tasks, Inner(rule, 2000), differentiated=0).weights  # w*, to rounding
    exact = dense_ift(problem, phi, solution, tasks, 0, 0.0)
    by_steps = [relative(meta_gradient(problem, phi, tasks, Inner(rule, k, ImplicitCG(cg_steps=30, cg_tol=0.0)))
                         .grad_sum, exact) for k in (30, 100, 300, 1000)]
    assert all(later < earlier for earlier, later in zip(by_steps, by_steps[1:])), by_steps
    assert by_steps[-1] < 1e-8
    # The solvers alone, after 300 inner steps (close enough to w* that the solver's own error dominates
    # until its last iterations): error falls with their iterations.
    by_cg = [relative(meta_gradient(problem, phi, tasks, Inner(rule, 300, ImplicitCG(cg_steps=n, cg_tol=0.0)))
                      .grad_sum, exact) for n in (1, 4, 10, 25)]
    by_neumann = [relative(meta_gradient(problem, phi, tasks, Inner(rule, 300, Neumann(terms=n, alpha=4.0)))
                           .grad_sum, exact) for n in (10, 50, 200, 1000)]
    for errors in (by_cg, by_neumann):
        assert all(later < earlier for earlier, later in zip(errors, errors[1:])), errors
        assert errors[0] > 1e-2 and errors[-1] < 1e-6, errors


def test_the_config_s_implicit_settings_are_within_1e_4_of_the_dense_solve(tmp_path, capsys):
    code = cli.main(["gradcheck", str(CONFIG), "--json", str(tmp_path / "report.json")])
    assert code == 0, capsys.readouterr()
    report = json.loads((tmp_path / "report.json").read_text())
    for name in ("second_order", "implicit", "neumann"):
        assert report["methods"][name]["exact"]
    assert report["methods"]["second_order"]["reference"] == "finite_difference"
    assert report["methods"]["second_order"]["rel_error"] <= 1e-6
    for name in ("implicit", "neumann"):
        assert report["methods"][name]["reference"] == "dense_ift" and report["methods"][name]["rel_error"] <= 1e-4
    assert not report["methods"]["finite_difference"]["exact"]
    assert "start at phi" in report["skipped"]["reptile"]


def test_the_finite_difference_method_approaches_truncated_one_step_like_eps_squared():
    """On MAML, where the last step's Hessian term matters (on the decay problem the mixed term is
    linear in w and the difference exact): a tenth of eps, a hundredth of the error."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)).double()
    tasks = SineTasks(seed=4, support=5, query=6, dtype=torch.float64).sample(STREAM_TRAIN, 0, torch.arange(4))
    problem, phi, rule = MAML(model), dict(model.named_parameters()), make_rule("sgd", 0.05)
    target = meta_gradient(problem, phi, tasks, Inner(rule, 3, Truncated(1))).grad_sum
    errors = [relative(meta_gradient(problem, phi, tasks, Inner(rule, 3, FiniteDifference(eps))).grad_sum, target)
              for eps in (1e-2, 1e-3, 1e-4)]
    assert errors[0] > 1e-7
    for coarse, fine in zip(errors, errors[1:]):
        assert 0.005 < fine / coarse < 0.02, errors


def test_gradcheck_fails_a_method_that_drops_a_term(tmp_path, capsys):
    (tmp_path / "broken.py").write_text(
        "import dataclasses\n"
        "from distmaml.meta import CG, Implicit\n"
        "@dataclasses.dataclass(frozen=True)\n"
        "class DropsTheMixedTerm(Implicit):\n"
        "    '''The implicit hypergradient without -(d_phi grad_w L_in)^T v: only the direct term.'''\n"
        "    name = 'drops_the_mixed_term'\n"
        "    solve: CG = CG(cg_steps=30, cg_tol=0.0)\n"
        "    def hypergradient(self, problem, phi, tasks, inner, step_weights=None):\n"
        "        result = super().hypergradient(problem, phi, tasks, inner, step_weights)\n"
        "        return result._replace(grad_sum={n: 0 * g for n, g in result.grad_sum.items()})\n")
    code = cli.main(["gradcheck", str(CONFIG), f"inner.mode={tmp_path / 'broken.py'}:DropsTheMixedTerm",
                     "inner.steps=100", "inner.lr=4.0", "--tasks", "1"])
    out, err = capsys.readouterr()
    assert code == 1
    assert err.strip().splitlines() == ["distmaml gradcheck: error: "
                                        f"{tmp_path / 'broken.py'}:DropsTheMixedTerm should equal the reference and do not"]
    assert "| implicit | dense_ift |" in out and "FAIL" in out


def test_training_the_decays_lowers_the_validation_loss(tmp_path):
    result = run_cli(["train", str(CONFIG), f"run.dir={tmp_path}", "train.iterations=30", "train.log_every=10",
                      "inner.steps=100", "implicit.inner_safeguard=false", "eval.tasks=4", "eval.steps=100",
                      "logging.progress=false"])
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["validation_loss_after"] < lines[0]["validation_loss_after"] - 0.01
    assert "validation loss" in result.stdout and "test accuracy" in result.stdout


USER_PROBLEMS = '''
import torch
from distmaml.meta import WeightDecay
from distmaml.meta.problems import binary_accuracy, binary_cross_entropy

def decay(model, family):
    return WeightDecay(model, family.dataset, binary_cross_entropy, binary_accuracy)

class Vector(WeightDecay):
    def outer_loss(self, weights, phi, task):  # per example, not a scalar
        return (self.predict(weights, phi, self.data.val_x).squeeze(-1) - self.data.val_y) ** 2

def vector(model, family):
    return Vector(model, family.dataset, binary_cross_entropy, binary_accuracy)

class Linear(WeightDecay):
    def inner_loss(self, weights, phi, task, step):  # linear in the weights: no Hessian
        return sum((weights[n] * phi["log_decay." + n].exp()).sum() for n in self.decayed)

def linear(model, family):
    return Linear(model, family.dataset, binary_cross_entropy, binary_accuracy)

def nothing(model, family):
    return object()

class Branching(WeightDecay):
    def inner_loss(self, weights, phi, task, step):  # a Python branch on a value: cannot run batched
        loss = super().inner_loss(weights, phi, task, step)
        return loss * 0 if loss.item() > 1e6 else loss

def branching(model, family):
    return Branching(model, family.dataset, binary_cross_entropy, binary_accuracy)
'''


@pytest.mark.parametrize("overrides, message", [
    (["problem.name=no_such_module:build"], "problem.name = 'no_such_module:build': cannot import no_such_module"),
    (["problem.name=mine.py:missing"], "problem.name = 'mine.py:missing': mine.py has no attribute 'missing'"),
    (["problem.name=mine.py:nothing"], "problem.name = 'mine.py:nothing': the problem built (object) lacks "
                                       "meta_parameters, inner_template, start, inner_loss, outer_loss, metrics, to"),
    (["problem.name=mine.py:vector"], "problem.name = 'mine.py:vector': Vector: outer_loss of one task must be a "
                                      "floating-point scalar tensor, got shape (100,)"),
    (["problem.name=mine.py:linear", "inner.mode=implicit"], "command line: inner.mode = 'implicit': needs an inner "
     "loss with second derivatives in the weights, and Linear's is linear in them or not twice differentiable"),
    *[(["problem.name=mine.py:branching", f"engine.memory_check={check}"], "problem.name = 'mine.py:branching': "
       "Branching: inner_loss reads a tensor's value (.item(), float(), a Python if on a tensor) at ")
      for check in ("true", "false")],  # refused on shape-only tensors, or on the first batch under vmap
    (["inner.mode=neumann", "neumann.alpha=50"], "command line: neumann.alpha = 50.0: the Neumann series diverges"),
    (["inner.mode=finite_difference", "finite_difference.eps=0"], "command line: finite_difference.eps = 0.0: "
                                                                   "must be > 0"),
])
def test_a_problem_or_method_that_cannot_work_is_refused_in_one_line_before_any_step(overrides, message, tmp_path,
                                                                                      monkeypatch, capsys):
    from distmaml.commands import cli

    (tmp_path / "mine.py").write_text(USER_PROBLEMS)
    monkeypatch.chdir(tmp_path)
    # A relative file path is made absolute when the config is loaded (distmaml.imports.absolute_specs).
    mine = tmp_path / "mine.py"
    message = message.replace("'mine.py:", f"'{mine}:").replace(": mine.py has", f": {mine} has")
    code = cli.main(["train", str(CONFIG), f"run.dir={tmp_path / 'run'}", "inner.steps=3", *overrides])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if " INFO " not in line]  # progress lines may come first
    assert code == 2 and len(errors) == 1 and errors[0].startswith("distmaml train: error: "), stderr
    assert message in errors[0], stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_problem_on_a_family_without_a_data_set_is_refused_in_one_line(tmp_path, capsys):
    from distmaml.commands import cli

    code = cli.main(["train", str(REPO / "configs/sine_debug.yaml"), f"run.dir={tmp_path}", "problem.name=weight_decay"])
    assert code == 2 and capsys.readouterr().err.strip() == (
        "distmaml train: error: command line: problem.name = 'weight_decay': needs a task family whose tasks are "
        "training runs on a data set (logistic, mnist1d, or your own with a `dataset`); task.family = 'sine' has none")
