"""Task families. Each samples a batch of tasks as a pure function of (seed, stream, iteration,
global task index), on the training device, task dimension first, so that a shard of a meta-batch
is exactly the slice of the whole batch that a single process would have built.

Built in: sine (regression), omniglot and image_folder (N-way K-shot classification); logistic,
mnist1d and digits (training runs on a data set, for hyperparameter and data learning). Your own: any class
following distmaml.tasks.TaskFamily, named in task.family by import path.
"""

from __future__ import annotations

import torch

from distmaml.imports import call_user, resolve
from distmaml.meta.functional import TaskBatch  # re-exported: the families build these
from distmaml.tasks.protocol import FamilyError, TaskFamily, check_family, missing_members

__all__ = ["FAMILIES", "FamilyError", "TaskBatch", "TaskFamily", "build_task_family", "check_family"]

FAMILIES = {"sine": "distmaml.tasks.sine:SineTasks", "omniglot": "distmaml.tasks.omniglot:OmniglotTasks",
            "image_folder": "distmaml.tasks.image_folder:ImageFolderTasks",
            "logistic": "distmaml.tasks.logistic:LogisticRuns", "mnist1d": "distmaml.tasks.mnist1d:MNIST1DRuns",
            "digits": "distmaml.tasks.digits:DigitsRuns"}


def build_task_family(config, device: torch.device | str, dtype: torch.dtype = torch.float32) -> TaskFamily:
    """The task family config.task.family names, ready to sample on `device`; task.args are passed
    to its from_config. A class that lacks a member of the protocol is refused in one line."""
    family_class = resolve(config.task.family, FAMILIES, "task.family")
    if missing := missing_members(family_class):
        raise FamilyError(f"task.family = {config.task.family!r}: {getattr(family_class, '__name__', family_class)} "
                          f"lacks {', '.join(missing)} (see distmaml.tasks.TaskFamily)")
    family = call_user(family_class.from_config, f"task.family = {config.task.family!r}: from_config", FamilyError,
                       config, device=device, dtype=dtype, **config.task.args)
    if missing := missing_members(family):
        raise FamilyError(f"task.family = {config.task.family!r}: the family built lacks {', '.join(missing)}")
    return family
