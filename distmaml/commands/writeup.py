"""The names of the MAML write-up this project grew from, as thin functions over distmaml's API.

A reader who knows MAML as

    adapted = inner_loop(model, params, x_support, y_support, inner_lr, inner_steps)
    loss = outer_loop_loss(model, adapted, x_query, y_query)
    model = train_maml(num_iterations, num_tasks_per_batch, inner_lr, outer_lr)
    model = train_fomaml(num_iterations, num_tasks_per_batch, inner_lr, outer_lr)
    losses = test_adaptation(model, new_task)

finds each here. Training goes through `distmaml.commands.train` (batched over tasks, checkpointed, the
same code as `distmaml train`); `inner_loop` is the per-task reference the batched engine is
tested against (distmaml.meta.reference).
"""

from __future__ import annotations

import torch
from torch import nn

from distmaml.evaluate import test_adaptation
from distmaml.meta import LossFn, Params, functional_forward, inner_loop, mse

__all__ = ["inner_loop", "outer_loop_loss", "test_adaptation", "train_fomaml", "train_maml"]


def outer_loop_loss(model: nn.Module, adapted_params: Params, x_query: torch.Tensor, y_query: torch.Tensor,
                    loss_fn: LossFn = mse) -> torch.Tensor:
    """The query loss of one task's adapted weights: what MAML's outer loop minimises (its mean over tasks)."""
    return loss_fn(functional_forward(model, adapted_params, x_query), y_query)


def train_maml(num_iterations: int = 70000, num_tasks_per_batch: int = 25, inner_lr: float = 0.01,
               outer_lr: float = 0.001, inner_steps: int = 1, run_dir: str = "runs/train_maml",
               *overrides: str) -> nn.Module:
    """Second-order MAML on the sine tasks (the paper's protocol by default); returns the trained model.

    `overrides` are further `key.sub=value` settings (see `distmaml config`). The run (checkpoints,
    metrics, summary.json) is written to `run_dir`; calling it again resumes there.
    """
    return _train_sine("second_order", num_iterations, num_tasks_per_batch, inner_lr, outer_lr, inner_steps, run_dir,
                       overrides)


def train_fomaml(num_iterations: int = 70000, num_tasks_per_batch: int = 25, inner_lr: float = 0.01,
                 outer_lr: float = 0.001, inner_steps: int = 5, run_dir: str = "runs/train_fomaml",
                 *overrides: str) -> nn.Module:
    """First-order MAML (the meta-gradient taken at the adapted weights) on the sine tasks; the trained model."""
    return _train_sine("first_order", num_iterations, num_tasks_per_batch, inner_lr, outer_lr, inner_steps, run_dir,
                       overrides)


def _train_sine(mode: str, iterations: int, tasks: int, inner_lr: float, outer_lr: float, inner_steps: int,
                run_dir: str, overrides: tuple[str, ...]) -> nn.Module:
    from distmaml.commands.train import train
    from distmaml.config import load_config
    from distmaml.errors import TrainingError
    from distmaml.run.restore import load_trained

    config = load_config(None, [f"inner.mode={mode}", f"train.iterations={iterations}", f"train.meta_batch={tasks}",
                                f"inner.lr={inner_lr}", f"train.lr={outer_lr}", f"inner.steps={inner_steps}",
                                f"run.dir={run_dir}", "logging.progress=false", *overrides])
    summary = train(config)
    if summary["status"] not in ("complete", "time_limit"):  # never hand back an older checkpoint's model
        raise TrainingError(summary.get("error") or f"training stopped early ({summary['status']})")
    return load_trained(run_dir).learner.model
