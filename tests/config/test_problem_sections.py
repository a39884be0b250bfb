"""The problems' own config sections (maml, training_run, weight_decay, hyperclean, distill): old
problem.* keys migrate from a file, the command line and a saved run; a typo is refused naming the
section's keys; a setting the run does not use is said to be unused."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from distmaml.build import build
from distmaml.commands import cli
from distmaml.config import ConfigError, flatten, from_dict, from_flat, load_config, to_dict
from distmaml.config.migration import RENAMED
from distmaml.config.schema import PROBLEM_SECTIONS
from distmaml.meta import MAML, Distillation, Reweighting, TrainingRun, WeightDecay
from distmaml.run.checkpoint import load_checkpoint, save_checkpoint
from conftest import REPO

LOGISTIC = REPO / "configs/logistic_weight_decay.yaml"
SINE = REPO / "configs/sine_debug.yaml"
# Non-default values for every moved key of one training-run problem, and MAML's own.
NEW = {"weight_decay.per": "tensor", "weight_decay.init": 0.05, "training_run.batch_size": 16,
       "training_run.outer": "loss"}
OLD = {old: NEW[new] for old, new in RENAMED.items() if new in NEW}


def old_tree(tree: dict) -> dict:
    """A config as the version before the problems' sections wrote it: every moved key in problem:."""
    tree = {section: dict(keys) for section, keys in tree.items()}
    for old, new in RENAMED.items():
        section, name = new.split(".")
        tree["problem"][old.split(".")[1]] = tree[section].pop(name)
    for section in {new.split(".")[0] for new in RENAMED.values()}:
        assert not tree[section], tree[section]
        del tree[section]
    return tree


def config_warnings(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "distmaml.config"]


def test_old_keys_on_the_command_line_and_in_a_file_are_read_as_the_new_ones(tmp_path, caplog):
    caplog.set_level(logging.WARNING, "distmaml.config")
    from_command_line = load_config(LOGISTIC, [f"{key}={value}" for key, value in OLD.items()])
    assert {key: flatten(from_command_line)[key] for key in NEW} == NEW
    assert "command line: problem.decay_per is weight_decay.per now; read as weight_decay.per" in config_warnings(caplog)
    path = tmp_path / "old.yaml"
    path.write_text(LOGISTIC.read_text().replace("weight_decay:\n  per: input\n  init: 0.01\n", "").replace(
        "problem:\n  name: weight_decay\n", "problem:\n  name: weight_decay\n" + "".join(
            f"  {key.split('.')[1]}: {value}\n" for key, value in OLD.items())))
    caplog.clear()
    from_file = load_config(path)
    assert flatten(from_file) == {**flatten(from_command_line), "run.dir": flatten(from_file)["run.dir"]}
    assert len([line for line in config_warnings(caplog) if " now; read as " in line]) == len(OLD)
    # The command line still wins over the file, whichever name each uses.
    assert load_config(path, ["weight_decay.init=0.5"]).weight_decay.init == 0.5
    assert load_config(LOGISTIC, ["problem.decay_init=0.5"]).weight_decay.init == 0.5
    # The library reads them as the command line does.
    assert from_flat({"problem.name": "weight_decay", **OLD}).weight_decay == from_command_line.weight_decay


def test_an_old_and_a_new_name_of_one_setting_in_one_file_are_refused(tmp_path):
    path = tmp_path / "both.yaml"
    path.write_text("problem:\n  name: maml\n  proximal: 1.0\nmaml:\n  proximal: 2.0\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value) == (f"{path}: problem.proximal and maml.proximal are one setting (problem.proximal is "
                                 "its old name): give maml.proximal once")


@pytest.mark.parametrize("override, message", [
    ("hyperclean.weightng=mean", "command line: unknown key 'hyperclean.weightng' (did you mean "
                                 "'hyperclean.weighting'? hyperclean's keys: init, weighting)"),
    ("distill.per_klass=3", "command line: unknown key 'distill.per_klass' (did you mean 'distill.per_class'? "
                            "distill's keys: per_class, init, fixed_init)"),
    ("maml.lam=5", "command line: unknown key 'maml.lam' (maml's keys: proximal)"),
    ("training_run.outer=soft_error", "command line: training_run.outer = 'soft_error': applies to the problems that "
                                      "train a network from scratch (learning_rate, activation, weight_decay, "
                                      "hyperclean, distill, weighting_net, learning_to_reweight), not to "
                                      "problem.name = 'maml'"),
    ("problem.batch_size=8", "command line: training_run.batch_size = 8: applies to the problems that train a network "
                             "from scratch (learning_rate, activation, weight_decay, hyperclean, distill, weighting_net, "
                             "learning_to_reweight), not to problem.name = 'maml'"),
    ("hyperclean.weighting=sum", "command line: hyperclean.weighting = 'sum': must be one of normalised, mean"),
])
def test_a_bad_problem_setting_is_one_line(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert str(caught.value) == message


@pytest.mark.parametrize("path, override, message", [
    (LOGISTIC, "weight_decay.init=0", "command line: weight_decay.init = 0.0: must be > 0"),
    (LOGISTIC, "training_run.batch_size=-1", "command line: training_run.batch_size = -1: must be >= 0 (0: the whole "
                                             "training split at every step)"),
    (SINE, "maml.proximal=-1.5", "command line: maml.proximal = -1.5: must be >= 0"),
])
def test_a_problem_checks_its_own_values_where_it_is_built(path, override, message):
    """Once, by the problem (the config's checks leave them to it), in the config's words."""
    with pytest.raises(ConfigError) as caught:
        build(load_config(path, [override]))
    assert str(caught.value) == message


@pytest.mark.parametrize("overrides, path_sets, expected", [
    (["problem.name=hyperclean", "weight_decay.init=0.1"], False,
     ["command line: weight_decay.init is set but problem.name = 'hyperclean' does not read weight_decay.*"]),
    (["maml.proximal=1.0", "problem.name=distill"], False,
     ["command line: maml.proximal is set but problem.name = 'distill' does not read maml.*"]),
    (["inner.mode=implicit", "neumann.terms=5"], False,
     ["command line: neumann.terms is set but inner.mode = 'implicit' does not read it"]),
    (["inner.truncate=2"], False, ["command line: inner.truncate is set but inner.mode = 'second_order' does not read "
                                   "it"]),
    (["inner.momentum=0.9", "inner.schedule_blocks=2"], False,
     ["command line: inner.momentum is set but inner.rule = 'sgd' does not read it",
      "command line: inner.schedule_blocks is set but inner.rule = 'sgd' does not read it"]),
    (["inner.rule=momentum", "inner.momentum=0.9"], False, []),
    (["inner.mode=neumann", "implicit.damping=0.5", "neumann.terms=5", "problem.name=maml", "maml.proximal=1"],
     False, []),
    ([], False, []),  # the defaults of every section, read or not, are no one's choice
    # A file's setting is not questioned once the command line chose another problem or method...
    (["problem.name=hyperclean"], True, []),
    # ...but is where the file itself chose.
    ([], True, ["{path}: hyperclean.init is set but problem.name = 'maml' does not read hyperclean.*"]),
    # A file's method settings are not: one file often serves several methods.
    (["problem.name=hyperclean", "inner.mode=implicit"], True, []),
])
def test_a_setting_the_run_does_not_use_is_said_once_where_it_was_set(overrides, path_sets, expected, tmp_path,
                                                                       caplog):
    caplog.set_level(logging.WARNING, "distmaml.config")
    path = None
    if path_sets:
        path = tmp_path / "mine.yaml"
        path.write_text("problem:\n  name: maml\nhyperclean:\n  init: 1.0\nneumann:\n  terms: 5\n")
    load_config(path, overrides)
    assert config_warnings(caplog) == [line.format(path=path) for line in expected]


def test_every_shipped_config_loads_and_uses_every_problem_setting_it_gives(caplog):
    caplog.set_level(logging.WARNING, "distmaml.config")
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) > 20
    for path in configs:
        assert load_config(path).problem.name in PROBLEM_SECTIONS
    assert config_warnings(caplog) == []
    # gradcheck runs every method: the settings of another one than inner.mode are used there.
    load_config(LOGISTIC, ["neumann.terms=50"])
    assert config_warnings(caplog) == ["command line: neumann.terms is set but inner.mode = 'implicit' does not read it"]
    caplog.clear()
    load_config(LOGISTIC, ["neumann.terms=50"], every_method=True)
    assert config_warnings(caplog) == []


def test_a_saved_config_with_the_old_keys_is_migrated():
    config = load_config(LOGISTIC, [f"{key}={value}" for key, value in NEW.items()])
    saved = old_tree(to_dict(config))
    assert "weight_decay" not in saved and saved["problem"]["decay_per"] == "tensor"
    assert flatten(from_dict(saved, "ckpt.pt")) == flatten(config)
    # A maml run saved with a batch size it never read (accepted then, refused now) still loads.
    maml = old_tree(to_dict(load_config(None, ["maml.proximal=0.5"])))
    maml["problem"]["batch_size"] = 32
    assert from_dict(maml, "ckpt.pt").training_run.batch_size == 0
    # A hyperclean run saved before its weighting was a setting trained on the plain mean; other
    # problems keep today's default.
    for name, weighting in (("hyperclean", "mean"), ("maml", "normalised"), ("distill", "normalised")):
        tree = old_tree(to_dict(load_config(None, [f"problem.name={name}"])))
        del tree["problem"]["example_weighting"]
        assert from_dict(tree, "ckpt.pt").hyperclean.weighting == weighting


def tensors(value, prefix=""):
    """Every tensor in a checkpoint's state, by path."""
    if torch.is_tensor(value):
        yield prefix, value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from tensors(item, f"{prefix}.{key}")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            yield from tensors(item, f"{prefix}[{index}]")


def test_a_run_saved_under_the_old_keys_resumes_bit_for_bit_under_the_new_ones(tmp_path):
    def train(run_dir, iterations):
        return cli.main(["train", str(LOGISTIC), f"run.dir={run_dir}", f"train.iterations={iterations}",
                         "train.checkpoint_every=2", "train.log_every=1", "inner.steps=4", "inner.mode=second_order",
                         "train.meta_batch=4", "eval.at_end=false", "logging.progress=false",
                         *[f"{key}={value}" for key, value in NEW.items()]])

    assert train(tmp_path / "straight", 4) == 0
    assert train(tmp_path / "resumed", 2) == 0
    path = tmp_path / "resumed" / "checkpoints" / "ckpt_00000002.pt"
    state = load_checkpoint(path)
    state["config"] = old_tree(state["config"])
    save_checkpoint(path.parent, state)
    assert load_checkpoint(path)["config"]["problem"]["decay_init"] == NEW["weight_decay.init"]
    assert train(tmp_path / "resumed", 4) == 0
    straight = dict(tensors(load_checkpoint(tmp_path / "straight" / "checkpoints" / "ckpt_00000004.pt")))
    resumed = dict(tensors(load_checkpoint(tmp_path / "resumed" / "checkpoints" / "ckpt_00000004.pt")))
    assert straight.keys() == resumed.keys() and len(straight) > 0
    for name, value in straight.items():
        assert torch.equal(value, resumed[name]), name


def test_the_sections_defaults_are_the_problems_own():
    """The schema cannot import the problems (torch): this checks the two against each other."""
    def default(cls, name):
        return {spec.name: spec.default for spec in dataclasses.fields(cls)}[name]

    config = load_config(None, [])
    assert config.maml.proximal == default(MAML, "proximal")
    assert config.training_run.batch_size == default(TrainingRun, "batch_size")
    assert (config.training_run.outer == "loss") == (default(TrainingRun, "outer_fn") is None)
    assert (config.weight_decay.per, config.weight_decay.init) == (default(WeightDecay, "per"),
                                                                     default(WeightDecay, "initial"))
    assert config.hyperclean.init == default(Reweighting, "initial")
    assert (config.hyperclean.weighting == "normalised") == default(Reweighting, "normalised")
    assert (config.distill.per_class, config.distill.init, config.distill.fixed_init) == (
        default(Distillation, "per_class"), default(Distillation, "initial"), default(Distillation, "fixed_init"))
