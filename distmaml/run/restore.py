"""Restoring what a checkpoint holds: phi's parts into a built learner, or a whole trained run.

    trained = load_trained("runs/sine_maml")     # the config, the learner as it was trained, the file

What a checkpoint keeps of phi (the model's weights, the rule's and the problem's own parameters) is
written by `checkpoint_state` and read back by `restore`; building from a config is distmaml.build's,
files on disk are distmaml.run.checkpoint's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import torch

from distmaml.build import Learner, build
from distmaml.config import Config, from_dict
from distmaml.imports import check_user_files
from distmaml.run.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint, load_weights


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
    if config.run.user_code != "any":  # before the files are imported: no changed code runs
        check_user_files(state.get("user_files", {}), str(path), config, override="give --user-code any")
    learner = build(config, device)
    restore(learner, state, path)
    return Trained(config, learner, path)


def checkpoint_state(learner: Learner) -> dict[str, Any]:
    """What a checkpoint keeps of phi: the model's weights, the rule's and the problem's own parameters."""
    return {"model": learner.model.state_dict(),
            "buffers": sorted(name for name, _ in learner.model.named_buffers()),  # not checked for finiteness
            "rule": {name: value.detach() for name, value in learner.learned.items()},
            "problem": {name: value.detach() for name, value in learner.problem_parameters.items()}}


def restore(learner: Learner, state: dict[str, Any], path: Path) -> None:
    """Load a checkpoint's model weights, learned rule parameters and problem parameters into `learner`."""
    load_weights(learner.model, state["model"], path)
    for part, ours, what in (("rule", learner.learned, "learned inner-rule parameters"),
                             ("problem", learner.problem_parameters, "problem parameters")):
        saved = state.get(part, {})
        if set(saved) != set(ours):
            raise CheckpointError(f"{path}: its {what} ({', '.join(sorted(saved)) or 'none'}) do not fit the ones "
                                  f"its config describes ({', '.join(sorted(ours)) or 'none'})")
        with torch.no_grad():
            for name, value in ours.items():
                if saved[name].shape != value.shape:
                    raise CheckpointError(f"{path}: {name} has shape {tuple(saved[name].shape)}, the config needs "
                                          f"{tuple(value.shape)}")
                value.copy_(saved[name])
