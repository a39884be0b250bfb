"""Problems as a config names them: problem.name -> a distmaml.meta problem built from the run's
model and task family (the math lives in distmaml.meta.problems; this module only wires it).

    problem.name: maml                           # initial weights: MAML and its family
    problem.name: learning_rate                  # a network trained from scratch; phi: the rule's step sizes
    problem.name: activation                     # ...; phi: the model's learned activation function
    problem.name: weight_decay                   # ...; phi: a learned L2 decay
    problem.name: hyperclean                     # ...; phi: a weight per training example (noisy labels)
    problem.name: weighting_net                  # ...; phi: a net from an example's loss to its weight
    problem.name: learning_to_reweight           # ...; no phi: each batch's weights by a lookahead (online)
    problem.name: distill                        # ...; phi: a few synthetic examples per class
    problem.name: my_package.problems:build      # yours: build(model=..., family=..., **problem.args)
"""

from __future__ import annotations

from typing import Any

from distmaml.config.schema import PROBLEM_SECTIONS
from distmaml.errors import ConfigError, SettingError
from distmaml.imports import call_user, resolve
from distmaml.meta import (MAML, Distillation, LearningToReweight, Reweighting, TrainingRun, WeightDecay,
                           WeightingNet)
from distmaml.meta.problems import soft_error
from distmaml.meta.problem import ProblemError, check_meta_parameters, missing_members

PROBLEMS = {name: f"distmaml.problems:build_{name}" for name in PROBLEM_SECTIONS}
ACTIVATION_PREFIX = "activation."  # distmaml.models.MLP's learned activation


def build_maml(config, model, family) -> MAML:
    accuracy = family.accuracy if family.is_classification else None
    return MAML(model, family.loss, tuple(config.inner.adapt), config.maml.proximal, accuracy)


def training_data(config, family):
    """The data set of a family whose tasks are training runs, or a one-line refusal."""
    data = getattr(family, "dataset", None)
    if data is None:
        raise SettingError("problem.name", config.problem.name, f"needs a task family whose tasks are training runs on "
                           f"a data set (logistic, mnist1d, or your own with a `dataset`); task.family = "
                           f"{config.task.family!r} has none")
    return data


def _training(config, model, family, kind: type = TrainingRun) -> dict[str, Any]:
    """The arguments of a training-run problem of class `kind`, once the family gives what it needs."""
    data = training_data(config, family)
    if getattr(kind, "needs_class_logits", False) and (lacks := _no_class_logits(family)):
        raise SettingError("problem.name", config.problem.name, f"task.family = {config.task.family!r} {lacks}; "
                           f"{config.problem.name} needs class logits (a family with >= 2 classes)")
    return dict(model=model, data=data, loss_fn=family.loss,
                accuracy_fn=family.accuracy if family.is_classification else None,
                batch_size=config.training_run.batch_size, outer_fn=_outer_loss(config, family),
                outer_batch=config.training_run.outer == "next_batch")


def _no_class_logits(family) -> str | None:
    """What keeps the family's outputs from being logits over two or more classes, or None."""
    if not family.is_classification:
        return "is not a classification family"
    outputs = getattr(family, "num_outputs", 0)
    if outputs == 1:
        return "has one output (a logistic regression's logit)"
    return None if outputs >= 2 else f"has {outputs} outputs"


def _outer_loss(config, family):
    """The outer loss training_run.outer names (None: the family's own loss; next_batch's is too, on the
    training mini-batch after the unroll: TrainingRun.outer_batch)."""
    if config.training_run.outer in ("loss", "next_batch"):
        return None
    if _no_class_logits(family):
        raise SettingError("training_run.outer", config.training_run.outer, f"soft_error scores a softmax over two or more "
                           f"classes; task.family = {config.task.family!r} has no class logits")
    return soft_error


def build_learning_rate(config, model, family) -> TrainingRun:
    """Plain training runs: phi is the inner rule's learned step sizes (inner.rule = schedule)."""
    return TrainingRun(**_training(config, model, family))


def build_activation(config, model, family) -> TrainingRun:
    """Training runs whose phi is the model's learned activation function (model.activation = learned)."""
    if not any(name.startswith(ACTIVATION_PREFIX) for name, _ in model.named_parameters()):
        raise SettingError("model.activation", config.model.activation, "problem.name = activation learns the "
                           "activation function: it needs model.activation = learned")
    return TrainingRun(**_training(config, model, family), phi_prefixes=(ACTIVATION_PREFIX,))


def build_weight_decay(config, model, family) -> WeightDecay:
    settings = config.weight_decay
    return WeightDecay(**_training(config, model, family), per=settings.per, initial=settings.init)


def build_hyperclean(config, model, family) -> Reweighting:
    """Per-example weights of the training split, learned on a clean validation split."""
    settings = config.hyperclean
    return Reweighting(**_training(config, model, family, Reweighting), initial=settings.init,
                       normalised=settings.weighting == "normalised",
                       flipped=getattr(family, "flipped", None))


def build_weighting_net(config, model, family) -> WeightingNet:
    """Meta-Weight-Net: a net from an example's loss to its weight, learned on a clean validation split."""
    net = config.weighting_net
    return WeightingNet(**_training(config, model, family, WeightingNet), hidden=net.hidden, classes=net.classes,
                        normalised=config.hyperclean.weighting == "normalised",
                        flipped=getattr(family, "flipped", None))


def build_learning_to_reweight(config, model, family) -> LearningToReweight:
    """Learning to Reweight: each batch's example weights from a one-step lookahead (online only)."""
    return LearningToReweight(**_training(config, model, family, LearningToReweight),
                              flipped=getattr(family, "flipped", None))


def build_distill(config, model, family) -> Distillation:
    """A few learned examples per class (distill.per_class) with soft labels."""
    settings = config.distill
    return Distillation(**_training(config, model, family), per_class=settings.per_class,
                        initial=settings.init, fixed_init=settings.fixed_init)


def build_problem(config, model, family) -> Any:
    """The problem config.problem.name names, for this run's model and task family."""
    name = config.problem.name
    builder = resolve(name, PROBLEMS, "problem.name")
    # training_run.* given to a problem that does not train from scratch is refused with the config
    # (distmaml.config.checks), before anything is built.
    if name in PROBLEMS:
        problem = builder(config, model, family)
    else:
        problem = call_user(builder, f"problem.name = {name!r}: its builder", ConfigError, model=model, family=family,
                            **config.problem.args)
    if missing := missing_members(problem):
        raise ProblemError(f"problem.name = {name!r}: the problem built ({type(problem).__name__}) lacks "
                           f"{', '.join(missing)} (see distmaml.meta.Problem)")
    # Where phi is first read: a number or an integer tensor in it would fail as it is made trainable.
    where = f"problem.name = {name!r}: {type(problem).__name__}"
    check_meta_parameters(call_user(problem.meta_parameters, f"{where}: meta_parameters()", ProblemError), where)
    return problem
