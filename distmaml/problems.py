"""Problems as a config names them: problem.name -> a distmaml.meta problem built from the run's
model and task family (the math lives in distmaml.meta.problems; this module only wires it).

    problem.name: maml                           # initial weights: MAML and its family
    problem.name: weight_decay                   # a learned L2 decay of a network trained from scratch
    problem.name: my_package.problems:build      # yours: build(model=..., family=..., **problem.args)
"""

from __future__ import annotations

from typing import Any

from distmaml.errors import ConfigError, SettingError
from distmaml.imports import call_user, resolve
from distmaml.meta import MAML, WeightDecay
from distmaml.meta.problem import ProblemError, missing_members

PROBLEMS = {"maml": "distmaml.problems:build_maml", "weight_decay": "distmaml.problems:build_weight_decay"}


def build_maml(config, model, family) -> MAML:
    accuracy = family.accuracy if family.is_classification else None
    return MAML(model, family.loss, tuple(config.inner.adapt), config.problem.proximal, accuracy)


def training_data(config, family):
    """The data set of a family whose tasks are training runs, or a one-line refusal."""
    data = getattr(family, "dataset", None)
    if data is None:
        raise SettingError("problem.name", config.problem.name, f"needs a task family whose tasks are training runs on "
                           f"a data set (logistic, or your own with a `dataset`); task.family = "
                           f"{config.task.family!r} has none")
    return data


def build_weight_decay(config, model, family) -> WeightDecay:
    problem = config.problem
    return WeightDecay(model, training_data(config, family), family.loss,
                       family.accuracy if family.is_classification else None, problem.batch_size,
                       per=problem.decay_per, initial=problem.decay_init)


def build_problem(config, model, family) -> Any:
    """The problem config.problem.name names, for this run's model and task family."""
    name = config.problem.name
    builder = resolve(name, PROBLEMS, "problem.name")
    args = {} if name in PROBLEMS else dict(config.problem.args)
    if name in PROBLEMS:
        problem = builder(config, model, family)
    else:
        problem = call_user(builder, f"problem.name = {name!r}: its builder", ConfigError, model=model, family=family,
                            **args)
    if missing := missing_members(problem):
        raise ProblemError(f"problem.name = {name!r}: the problem built ({type(problem).__name__}) lacks "
                           f"{', '.join(missing)} (see distmaml.meta.Problem)")
    return problem
