"""Adaptation to fresh tasks: the test-time half of MAML, and the numbers papers report."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.func import vmap

from distmaml.meta import detached, functional_forward, inner_loop, sgd_step
from distmaml.meta.functional import LossFn, Params
from distmaml.meta.implicit import regularised_step
from distmaml.tasks import TaskBatch
from distmaml.tasks.rng import STREAM_EVAL
from distmaml.tasks.sine import mse


def test_adaptation(model: nn.Module, params: Params, support_x: torch.Tensor, support_y: torch.Tensor,
                    query_x: torch.Tensor, query_y: torch.Tensor, inner_lr: float, steps: int,
                    loss_fn: LossFn = mse) -> list[float]:
    """Adapt to one task step by step; the query loss after 0, 1, ..., `steps` inner steps."""
    losses, adapted = [], detached(params)
    for step in range(steps + 1):
        with torch.no_grad():
            losses.append(loss_fn(functional_forward(model, adapted, query_x), query_y).item())
        if step < steps:
            adapted = detached(inner_loop(model, adapted, support_x, support_y, inner_lr, 1, "first_order",
                                          loss_fn=loss_fn))
    return losses


test_adaptation.__test__ = False  # a public API name, not a pytest test


def query_metrics(model: nn.Module, params: Params, batched: bool, x: torch.Tensor, y: torch.Tensor,
                  family) -> dict[str, torch.Tensor]:
    """Per-task query loss (and accuracy, for classification) of shared or per-task weights."""

    def metrics(point: Params, task_x: torch.Tensor, task_y: torch.Tensor) -> dict[str, torch.Tensor]:
        prediction = functional_forward(model, point, task_x)
        out = {"loss": family.loss(prediction, task_y)}
        if family.is_classification:
            out["accuracy"] = family.accuracy(prediction, task_y)
        return out

    with torch.no_grad():
        return vmap(metrics, in_dims=(0 if batched else None, 0, 0))(params, x, y)


def adaptation_curves(model: nn.Module, params: Params, batch: TaskBatch, inner_lr: float, steps: int,
                      family, prox_lam: float = 0.0, prox_safeguard: bool = False) -> dict[str, torch.Tensor]:
    """Query metrics of every task after 0..`steps` inner steps, batched: {name: [steps + 1, n]}.

    prox_lam > 0 adapts as iMAML trains: SGD on L_support(phi) + prox_lam/2 |phi - theta|^2, with
    `prox_safeguard` its per-task capped step (implicit.inner_safeguard).
    """
    update = sgd_step(model, family.loss, inner_lr, differentiable=False)
    theta = detached(params)
    adapted, batched, curves = theta, False, []
    for step in range(steps + 1):
        metrics = query_metrics(model, adapted, batched, batch.query_x, batch.query_y, family)
        # The support loss after adaptation shows over-fitting of the support set beside the query loss.
        metrics["support_loss"] = query_metrics(model, adapted, batched, batch.support_x, batch.support_y,
                                                family)["loss"]
        curves.append(metrics)
        if step < steps and prox_lam > 0:
            points = adapted if batched else {name: value.expand(batch.num_tasks, *value.shape)
                                              for name, value in theta.items()}
            adapted = regularised_step(model, points, theta, batch.support_x, batch.support_y, inner_lr, prox_lam,
                                       family.loss, prox_safeguard)
            batched = True
        elif step < steps:
            adapted = detached(vmap(update, in_dims=(0 if batched else None, 0, 0))(adapted, batch.support_x,
                                                                                   batch.support_y))
            batched = True
    return {name: torch.stack([c[name] for c in curves]) for name in curves[0]}


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (normal approximation, n >= 2)."""
    values = values.double()
    return values.mean().item(), 1.96 * values.std().item() / math.sqrt(values.numel())


def evaluate(model: nn.Module, params: Params, family, inner_lr: float, steps: int, tasks: int = 600,
             shots: int | None = None, query: int | None = None, stream: int = STREAM_EVAL,
             chunk: int = 200, prox_lam: float = 0.0, prox_safeguard: bool = False) -> dict[str, Any]:
    """Adapt to `tasks` fresh tasks; mean and 95% CI of each query metric after each step."""
    device = next(iter(params.values())).device
    per_chunk = []
    for start in range(0, tasks, chunk):
        indices = torch.arange(start, min(start + chunk, tasks), device=device)
        batch = family.sample(stream, 0, indices, support=shots, query=query)
        per_chunk.append(adaptation_curves(model, params, batch, inner_lr, steps, family, prox_lam,
                                           prox_safeguard))
    curves = {name: torch.cat([c[name] for c in per_chunk], dim=1) for name in per_chunk[0]}
    rows = []
    for step in range(steps + 1):
        row: dict[str, Any] = {"step": step}
        for name, values in curves.items():
            row[name], row[f"{name}_ci95"] = mean_ci95(values[step])
        rows.append(row)
    return {"tasks": tasks, "shots": shots if shots is not None else family.support, "inner_lr": inner_lr,
            "prox_lam": prox_lam, "steps": rows}


def evaluation_settings(config) -> dict[str, Any]:
    """evaluate()'s keyword arguments as a run's config asks for them."""
    return dict(inner_lr=config.inner.lr, steps=config.eval.steps, tasks=config.eval.tasks, shots=config.eval.shots,
                query=config.eval.query, prox_lam=config.implicit.lam if config.inner.mode == "implicit" else 0.0,
                prox_safeguard=config.inner.mode == "implicit" and config.implicit.inner_safeguard)


def format_table(result: dict[str, Any]) -> str:
    """The evaluation as a Markdown table, one row per number of inner steps."""
    names = [k for k in result["steps"][0] if k != "step" and not k.endswith("_ci95")]
    header = "| steps | " + " | ".join(f"{n.replace('_', ' ') if '_' in n else 'query ' + n} (95% CI)"
                                      for n in names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 1)]
    for row in result["steps"]:
        cells = []
        for name in names:
            scale, unit = (100.0, " %") if name == "accuracy" else (1.0, "")
            cells.append(f"{row[name] * scale:.4f} ± {row[name + '_ci95'] * scale:.4f}{unit}")
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
