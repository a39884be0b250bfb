"""Build once: what a config describes, for training, evaluation, plots and studies.

    learner = build(config, device)              # model, task family, inner loop, meta-parameters
    trained = load_trained("runs/sine_maml")     # the same, restored from a run directory or checkpoint

The meta-parameters theta are one dict: the model's weights, then the inner rule's learned
parameters (Meta-SGD's and LSLR's step sizes, named "inner.lr.<weight>"), so the outer optimizer,
the gradient all-reduce, checkpoints, the replica check and the CUDA graph carry both alike.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from distmaml.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_weights
from distmaml.config import Config, ConfigError, from_dict
from distmaml.meta import Inner, LossFn, make_rule, split

# Weights' dtype, and the autocast dtype of the model's matmuls/convolutions (None: no autocast).
DTYPES = {"float32": (torch.float32, None), "float64": (torch.float64, None), "bf16": (torch.float32, torch.bfloat16)}


class Learner(NamedTuple):
    model: nn.Module
    family: Any
    inner: Inner
    theta: dict[str, torch.Tensor]  # every meta-parameter: the model's weights, then `learned`
    learned: dict[str, torch.Tensor]  # the inner rule's learned parameters (checkpoints keep them as "rule")


def build_inner(config: Config, loss_fn: LossFn) -> Inner:
    """The inner loop config.inner (and config.implicit) describe, for a family with loss `loss_fn`."""
    inner = config.inner
    rule = make_rule(inner.rule, inner.lr, inner.steps, inner.momentum or 0.0, tuple(inner.betas), inner.eps)
    implicit = None
    if inner.mode == "implicit":
        settings = config.implicit
        # Stopping CG early needs the host to look at the residual each step; a CUDA graph cannot.
        implicit = dict(lam=settings.lam, cg_steps=settings.cg_steps, cg_damping=settings.cg_damping,
                        cg_tol=settings.cg_tol, inner_safeguard=settings.inner_safeguard,
                        stop_early=not config.engine.cuda_graph)
    return Inner(rule, inner.steps, loss_fn, inner.mode, inner.truncate, inner.checkpoint, inner.checkpoint_segment,
                 tuple(inner.adapt), implicit)


def build(config: Config, device: torch.device | str = "cpu") -> Learner:
    """Everything `config` describes, on `device`, in the weights' dtype (engine.dtype).

    The model's initial weights come from torch's global generator: seed it first for
    reproducible weights (the trainer seeds it with train.seed).
    """
    from distmaml.models import build_model
    from distmaml.tasks import build_task_family

    dtype = DTYPES[config.engine.dtype][0]
    family = build_task_family(config, device, dtype)
    # Sized from the family: any model fits any family whose inputs and outputs it takes.
    model = build_model(config, family.input_shape, family.num_outputs).to(device, dtype)
    inner = build_inner(config, family.loss)
    weights = dict(model.named_parameters())
    adapted, _, _ = split(weights, inner.adapt)
    if inner.adapt and (unmatched := [p for p in inner.adapt if not any(n.startswith(p) for n in weights)]):
        raise ConfigError(f"inner.adapt = {list(inner.adapt)}: no weight of the model starts with "
                          f"{', '.join(map(repr, unmatched))} (its weights: {', '.join(weights)})")
    learned = {name: nn.Parameter(value) for name, value in inner.rule.parameters(adapted).items()}
    return Learner(model, family, inner, {**weights, **learned}, learned)


class Trained(NamedTuple):
    config: Config
    learner: Learner
    checkpoint: Path


def load_trained(path: str | Path, device: str = "cpu", changes: dict[str, tuple[Any, str]] | None = None) -> Trained:
    """A checkpoint file, or a run directory's newest complete checkpoint, rebuilt as it was trained.

    `changes` ({"data.root": (value, "--data-root")}) replace settings of the saved config before it
    is validated and built (errors name the source given), e.g. where the data set has moved.
    """
    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint in this run directory")
        path = found
    state = load_checkpoint(path)
    config = from_dict(state["config"], str(path), {k: v for k, v in (changes or {}).items() if v[0] is not None})
    learner = build(config, device)
    restore(learner, state, path)
    return Trained(config, learner, path)


def restore(learner: Learner, state: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's model weights and learned rule parameters into `learner`, in place."""
    load_weights(learner.model, state["model"], path)
    saved = state.get("rule", {})
    if set(saved) != set(learner.learned):
        raise CheckpointError(f"{path}: its learned inner-rule parameters ({len(saved)}) do not fit the rule its "
                              f"config describes ({len(learner.learned)})")
    with torch.no_grad():
        for name, value in learner.learned.items():
            if saved[name].shape != value.shape:
                raise CheckpointError(f"{path}: learned parameter {name} has shape {tuple(saved[name].shape)}, "
                                      f"the rule needs {tuple(value.shape)}")
            value.copy_(saved[name])
