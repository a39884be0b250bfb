"""Build once: what a config describes, for training, evaluation, plots, gradcheck and studies.

    learner = build(config, device)              # model, task family, problem, inner loop, phi

Restoring a trained run from its checkpoint is distmaml.run.restore's (load_trained).

The meta-parameters phi are one dict: the problem's (MAML: the model's weights; weight_decay: the
log decays), then the inner rule's learned parameters (Meta-SGD's and LSLR's step sizes, named
"inner.lr.<weight>"), so the outer optimizer, the gradient all-reduce, checkpoints, the replica
check and the CUDA graph carry them all alike.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import nn

from distmaml.config import Config, sourced
from distmaml.errors import SettingError
from distmaml.imports import resolve
from distmaml.meta.online import check_mode
from distmaml.meta import (METHODS, Inner, Method, learned_names, make_method, make_rule, meta_parameters, method_settings,
                           rule_settings)

# Weights' dtype, and the autocast dtype of the model's matmuls/convolutions (None: no autocast).
DTYPES = {"float32": (torch.float32, None), "float64": (torch.float64, None), "bf16": (torch.float32, torch.bfloat16)}


class Learner(NamedTuple):
    model: nn.Module
    family: Any
    problem: Any
    inner: Inner
    theta: dict[str, torch.Tensor]  # phi: every meta-parameter, the problem's, then `learned`
    learned: dict[str, torch.Tensor]  # the inner rule's learned parameters (checkpoints keep them as "rule")

    @property
    def problem_parameters(self) -> dict[str, torch.Tensor]:
        """phi's entries that are neither the model's weights nor the rule's (checkpoints: "problem")."""
        own = {id(p) for p in self.model.parameters()}
        return {name: value for name, value in self.theta.items()
                if id(value) not in own and name not in self.learned}


def _setting(config: Config, key: str) -> Any:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _built_in_method(config: Config, mode: str) -> Method:
    """A built-in method with the settings its component takes, each read from the key it names."""
    settings = {name: _setting(config, key) for name, key in method_settings(mode).items() if key is not None}
    if "stop_early" in method_settings(mode):
        # Stopping CG early needs the host to look at the residual each step; a CUDA graph cannot.
        settings["stop_early"] = not config.engine.cuda_graph
    return make_method(mode, **settings)


def build_method(config: Config, mode: str | None = None) -> Method:
    """The hypergradient method inner.mode (or `mode`) names, with its settings from the config."""
    mode = config.inner.mode if mode is None else mode
    if ":" not in mode:
        return _built_in_method(config, mode)
    found = resolve(mode, {}, "inner.mode")
    return found() if isinstance(found, type) else found


def build_inner(config: Config, mode: str | None = None) -> Inner:
    """The inner loop config.inner describes, with the hypergradient method inner.mode (or `mode`) names.
    A rule or setting the method cannot work with is refused in one line naming where it came from.
    Every built-in method's settings are checked by their component, whichever method the run uses."""
    inner = config.inner
    try:
        # A rule's setting left at its default is blamed on inner.rule, which made it needed.
        settings = {name: _setting(config, key) for name, key in rule_settings(inner.rule).items()
                    if _setting(config, key) is not None}
        if config.online.runs and "steps" in settings:
            # Online, a rule's steps (a schedule's blocks divide them) are a run's: the horizon.
            settings["steps"] = config.online.horizon or config.online.unroll
        rule = make_rule(inner.rule, **settings)
    except SettingError as err:
        raise sourced(config, err, cause="inner.rule") from None
    try:
        for other in METHODS:
            _built_in_method(config, other)
        built = Inner(rule, inner.steps, build_method(config, mode), inner.checkpoint, inner.checkpoint_segment)
        method = built.method
        if inner.multi_step_loss and not method.trajectory_objective:
            raise SettingError("inner.multi_step_loss", True, f"needs a method that differentiates the unroll, not "
                               f"{method.name}")
        if inner.first_order_iterations and not method.differentiates_steps:
            raise SettingError("inner.first_order_iterations", inner.first_order_iterations, "anneals from first "
                               f"order to a method that differentiates inner steps (second_order, truncated), not "
                               f"{method.name}")
    except SettingError as err:
        raise sourced(config, err) from None
    return built


def build(config: Config, device: torch.device | str = "cpu", family: Any = None) -> Learner:
    """Everything `config` describes, on `device`, in the weights' dtype (engine.dtype); `family`, if
    given, is the task family already built (its data loaded once).

    The model's initial weights come from torch's global generator: seed it first for
    reproducible weights (the trainer seeds it with train.seed). On the `meta` device (under
    `with torch.device("meta")`) nothing is allocated: the shapes a memory estimate needs.
    """
    from distmaml.models import build_model
    from distmaml.problems import build_problem
    from distmaml.tasks import build_task_family

    dtype = DTYPES[config.engine.dtype][0]
    inner = build_inner(config)
    family = build_task_family(config, device, dtype) if family is None else family
    # Sized from the family: any model fits any family whose inputs and outputs it takes.
    model = build_model(config, family.input_shape, family.num_outputs).to(device, dtype)
    try:
        problem = build_problem(config, model, family)
    except SettingError as err:
        raise sourced(config, err, cause="problem.name") from None
    try:
        check_mode(problem, inner, bool(config.online.runs), config.online.horizon, config.online.burn_in,
                   config.online.runs)
    except SettingError as err:
        raise sourced(config, err, cause="problem.name") from None
    theta = meta_parameters(problem, inner)
    if not theta and not getattr(problem, "without_phi", False):
        raise sourced(config, SettingError("problem.name", config.problem.name, f"has nothing to learn: its meta-"
                                           f"parameters are the rule's step sizes, and inner.rule = "
                                           f"{config.inner.rule} learns none (schedule, meta_sgd and lslr do)"),
                      cause="inner.rule")
    learned = {name: theta[name] for name in learned_names(theta)}
    return Learner(model, family, problem, inner, theta, learned)
