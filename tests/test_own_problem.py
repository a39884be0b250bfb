"""A user's own problem, named by import path (problem.name: path/to/file.py:build): whatever breaks
the protocol is refused in one line before training, and the run keeps the file it trained with."""

import contextlib
import dataclasses
import hashlib
import json

import pytest
import torch

from distmaml.commands import cli
from distmaml.config import ConfigError, from_dict, load_config
from distmaml.errors import SettingError
from distmaml.imports import check_user_files, resolve, user_files
from distmaml.meta import Reweighting
from distmaml.meta.problems import class_accuracy, cross_entropy
from distmaml.tasks.logistic import LogisticRuns
from conftest import REPO

CONFIG = REPO / "configs/logistic_weight_decay.yaml"
# A logistic regression on 40 examples of 4 features, three inner steps, no memory estimate (it costs
# more than such a run): every run here takes a fraction of a second.
TINY = ["task.args.samples=40", "task.args.features=4", "task.args.informative=2", "task.args.train=20",
        "task.args.test=40", "inner.steps=3", "train.iterations=2", "train.meta_batch=2", "train.log_every=1",
        "train.checkpoint_every=1", "eval.tasks=2", "eval.steps=3", "logging.progress=false",
        "engine.memory_check=false"]

BROKEN = '''
import torch
from distmaml.meta import WeightDecay
from distmaml.meta.problems import binary_accuracy, binary_cross_entropy

class PhiFloat(WeightDecay):
    def meta_parameters(self):
        return {**super().meta_parameters(), "scale": 1.0}

class PhiInt(WeightDecay):
    def meta_parameters(self):
        return {**super().meta_parameters(), "count": torch.zeros(3, dtype=torch.int64)}

class ToNone(WeightDecay):
    def to(self, device):
        return None

class ThreeAccuracies(WeightDecay):
    def metrics(self, weights, phi, task):
        return {**super().metrics(weights, phi, task), "acc": torch.zeros(3)}

class DescribeRaises(WeightDecay):
    def describe(self, phi):
        return {"decay": phi["no_such_entry"]}

class DescribeParameter(WeightDecay):
    def describe(self, phi):
        return {"decay": next(iter(phi.values()))}

class DescribeObject(WeightDecay):
    def describe(self, phi):
        return {"decay": {"mean": object()}}

class IntegerOuterLoss(WeightDecay):
    def outer_loss(self, weights, phi, task):
        return super().outer_loss(weights, phi, task).long()

def build(model, family, kind):
    return globals()[kind](model, family.dataset, binary_cross_entropy, binary_accuracy)
'''

RAISING_LINE = 1 + next(number for number, line in enumerate(BROKEN.splitlines()) if "no_such_entry" in line)


@pytest.mark.parametrize("kind, message", [
    ("PhiFloat", "PhiFloat: meta_parameters() gives 'scale' as a float; phi must be a dict of floating-point tensors"),
    ("PhiInt", "PhiInt: meta_parameters() gives 'count' of dtype torch.int64; phi must be a dict of floating-point "
               "tensors"),
    ("ToNone", "ToNone: to('meta') returned None; it must return the problem on that device"),
    ("ThreeAccuracies", "ThreeAccuracies: metrics()['acc'] must be a scalar (a 0-dim floating-point tensor, one number "
                        "per task), got shape (3,)"),
    ("DescribeRaises", "DescribeRaises: describe failed: KeyError: 'no_such_entry' ("),
    ("DescribeParameter", "DescribeParameter: describe(phi) must return a dict of numbers, strings, lists and dicts (a "
                          "tensor as its .tolist() or .item()); describe()['decay'] is a Parameter, which JSON cannot "
                          "hold"),
    ("DescribeObject", "describe()['decay']['mean'] is an object, which JSON cannot hold"),
    ("IntegerOuterLoss", "IntegerOuterLoss: outer_loss of one task must be a floating-point scalar tensor, got dtype "
                         "torch.int64"),
])
def test_a_problem_that_breaks_the_protocol_is_refused_in_one_line_before_training(kind, message, tmp_path, capsys):
    (tmp_path / "mine.py").write_text(BROKEN)
    run = tmp_path / "run"
    # to() is first called by the memory estimate, on shape-only tensors: refused there, before it.
    estimate = ["engine.memory_check=true"] if kind == "ToNone" else []
    code = cli.main(["train", str(CONFIG), f"run.dir={run}", f"problem.name={tmp_path / 'mine.py'}:build",
                     f"problem.args.kind={kind}", *TINY, *estimate])
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if " INFO " not in line]
    assert code == 2 and len(errors) == 1, stderr
    assert errors[0].startswith(f"distmaml train: error: problem.name = '{tmp_path / 'mine.py'}:build': "), stderr
    assert message in errors[0], stderr
    assert not (run / "metrics.jsonl").exists() and not (run / "checkpoints").exists()
    if kind == "DescribeRaises":  # named where it failed, like the protocol's other functions
        assert errors[0].endswith(f"({tmp_path / 'mine.py'}:{RAISING_LINE})"), errors[0]


def marked(source: str) -> str:
    """A weight-decay problem whose describe() says which file it came from."""
    return ("from distmaml.meta import WeightDecay\n"
            "from distmaml.meta.problems import binary_accuracy, binary_cross_entropy\n"
            "class Marked(WeightDecay):\n"
            "    def describe(self, phi):\n"
            f"        return {{**super().describe(phi), 'source': {source!r}}}\n"
            "def build(model, family):\n"
            "    return Marked(model, family.dataset, binary_cross_entropy, binary_accuracy)\n")


@pytest.fixture(scope="module")
def relative_run(tmp_path_factory):
    """A run trained from directory a/ with problem.name = own/mine.py:build (a relative path), and a
    directory b/ holding another own/mine.py."""
    root = tmp_path_factory.mktemp("relative")
    for name in ("a", "b"):
        (root / name / "own").mkdir(parents=True)
        (root / name / "own" / "mine.py").write_text(marked(name))
    with contextlib.chdir(root / "a"):
        assert cli.main(["train", str(CONFIG), f"run.dir={root / 'run'}", "problem.name=own/mine.py:build",
                         "eval.at_end=false", *TINY]) == 0
    return root


def test_a_relative_path_is_the_file_of_the_directory_the_run_started_in_wherever_it_is_evaluated(relative_run,
                                                                                                   capsys):
    root = relative_run
    saved = (root / "run" / "config.yaml").read_text()
    assert f"name: {root / 'a' / 'own' / 'mine.py'}:build" in saved
    with contextlib.chdir(root / "b"):  # another own/mine.py here: evaluation must not pick it up
        assert cli.main(["eval", str(root / "run"), "--json", str(root / "eval.json")]) == 0
    capsys.readouterr()
    assert json.loads((root / "eval.json").read_text())["learned"]["source"] == "a"


def test_a_file_changed_since_the_checkpoint_is_refused_at_eval_and_at_resume_in_one_line(relative_run, capsys):
    root = relative_run
    file = root / "a" / "own" / "mine.py"
    before = file.read_text()
    try:
        file.write_text(before + "# edited after training\n")
        with contextlib.chdir(root / "a"):
            evaluated = cli.main(["eval", str(root / "run")])
            eval_err = capsys.readouterr().err.strip()
            resumed = cli.main(["train", str(CONFIG), f"run.dir={root / 'run'}", "problem.name=own/mine.py:build",
                                "eval.at_end=false", *TINY, "train.iterations=3"])
            resume_err = [line for line in capsys.readouterr().err.splitlines() if " INFO " not in line]
    finally:
        file.write_text(before)
    assert evaluated == 2 and "\n" not in eval_err, eval_err
    assert f"{file} has changed since" in eval_err, eval_err
    assert resumed == 2 and len(resume_err) == 1 and f"{file} has changed since" in resume_err[0], resume_err


def test_relative_file_paths_of_import_specs_are_made_absolute_when_a_config_is_loaded(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "run.yaml").write_text("problem:\n  name: own/mine.py:build\nmodel:\n  kind: nets/net.py:build\n")
    config = load_config(tmp_path / "run.yaml", ["inner.mode=methods/m.py:Mine", "task.family=my_package.tasks:T"])
    assert (config.problem.name, config.model.kind, config.inner.mode, config.task.family) == (
        f"{tmp_path}/own/mine.py:build", f"{tmp_path}/nets/net.py:build", f"{tmp_path}/methods/m.py:Mine",
        "my_package.tasks:T")
    assert load_config(None, ["model.kind=mlp"]).model.kind == "mlp"
    # A checkpoint's config is restored as saved: an old run's relative path resolves as it always did.
    assert from_dict({"problem": {"name": "own/mine.py:build"}}, "old.pt").problem.name == "own/mine.py:build"


def test_the_run_records_the_imported_file_and_refuses_it_changed_or_missing_in_one_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    file = tmp_path / "own" / "mine.py"
    file.parent.mkdir()
    file.write_text(marked("a"))
    config = load_config(CONFIG, ["problem.name=own/mine.py:build"])
    resolve(config.problem.name, {}, "problem.name")  # imported as the trainer does
    then = hashlib.sha256(file.read_bytes()).hexdigest()
    recorded = user_files(config)
    assert recorded == {f"{file}:build": then}
    check_user_files(recorded, "ckpt.pt", config)  # the same content: nothing to say

    file.write_text(marked("a") + "# edited\n")
    now = hashlib.sha256(file.read_bytes()).hexdigest()
    assert user_files(config) == recorded  # the content that was imported, not what is there now
    with pytest.raises(ConfigError) as changed:
        check_user_files(recorded, "ckpt.pt", config)
    assert str(changed.value) == (f"problem.name = '{file}:build': {file} has changed since ckpt.pt was written "
                                  f"(sha256 {then[:12]}… then, {now[:12]}… now); restore it, or set "
                                  "run.user_code=any to run the code as it is now")
    file.unlink()
    with pytest.raises(ConfigError, match=f"^problem.name = '{file}:build': {file} no longer exists; ckpt.pt was "
                                          "written with it"):
        check_user_files(recorded, "ckpt.pt", config)


class TwoClasses(LogisticRuns):
    """The logistic data with two class logits per example (a family hyperclean can weigh)."""

    @classmethod
    def from_config(cls, config, device, dtype=torch.float32, **args):
        runs = LogisticRuns.from_config(config, device, dtype, **args)
        return dataclasses.replace(runs, loss_fn=cross_entropy, accuracy_fn=class_accuracy, num_outputs=2)


def train_refusal(overrides: list[str], tmp_path, capsys) -> str:
    code = cli.main(["train", str(CONFIG), f"run.dir={tmp_path / 'run'}", *TINY, *overrides])
    errors = [line for line in capsys.readouterr().err.splitlines() if " INFO " not in line]
    assert code == 2 and len(errors) == 1, errors
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    return errors[0]


def test_hyperclean_on_a_family_with_one_output_is_refused_by_its_builder_in_one_line(tmp_path, capsys):
    assert train_refusal(["problem.name=hyperclean"], tmp_path, capsys) == (
        "distmaml train: error: command line: problem.name = 'hyperclean': task.family = 'logistic' has one output (a "
        "logistic regression's logit); hyperclean needs class logits (a family with >= 2 classes)")


@pytest.mark.parametrize("initial, why", [
    (-200, "every weight starts at sigmoid(-200), which underflows to 0 in float32 (the run's dtype), so the "
           "normalised loss sum w_i l_i / sum w_i is 0/0; give hyperclean.init >= -43"),
    (-60, "every weight starts at sigmoid(-60), whose square underflows to 0 in float32 (the run's dtype), so the "
          "hypergradient of the normalised loss"),
])
def test_initial_example_weights_that_underflow_are_refused_in_one_line(initial, why, tmp_path, capsys):
    line = train_refusal(["problem.name=hyperclean", f"task.family={__name__}:TwoClasses",
                          f"hyperclean.init={initial}"], tmp_path, capsys)
    assert line.startswith(f"distmaml train: error: command line: hyperclean.init = {float(initial)}: {why}"), line


def test_the_lowest_initial_weight_comes_from_the_dtype(tmp_path):
    model = torch.nn.Linear(4, 2)
    data = TwoClasses.from_config(load_config(CONFIG), "cpu").dataset
    for dtype, allowed in ((torch.float32, -43.0), (torch.float64, -354.0)):
        typed = data._replace(train_x=data.train_x.to(dtype))
        Reweighting(model.to(dtype), typed, initial=allowed)
        with pytest.raises(SettingError, match=rf"hyperclean.init >= {int(allowed)} "):
            Reweighting(model.to(dtype), typed, initial=allowed - 1)
        Reweighting(model.to(dtype), typed, initial=allowed - 1, normalised=False)  # the mean divides by the count
