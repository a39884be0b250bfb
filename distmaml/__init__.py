"""distmaml: exact, batched, distributed bi-level optimization and meta-learning.

The building blocks (distmaml.meta, pure functions; importing them loads nothing of the trainer):

- a problem: MAML(model, loss_fn), WeightDecay(...), or your own (distmaml.meta.Problem)
- Inner(rule=make_rule(...), steps=K, method=...): the inner loop and its hypergradient method
  (second_order, first_order, truncated, implicit, neumann, finite_difference, reptile)
- meta_parameters(problem, inner), meta_gradient(problem, phi, tasks, inner): phi and its gradient
- inner_loop, outer_loop_loss, train_maml, train_fomaml, test_adaptation: the MAML write-up's names
- train(config): the whole run that `distmaml train` performs
"""

from __future__ import annotations

import importlib

__version__ = "0.2.0"

_HOMES = {
    "Config": "distmaml.config", "load_config": "distmaml.config", "ConfigError": "distmaml.errors",
    "MLP": "distmaml.models", "SineTasks": "distmaml.tasks.sine", "train": "distmaml.commands.train",
    **{name: "distmaml.commands.writeup" for name in ("inner_loop", "outer_loop_loss", "test_adaptation",
                                                      "train_fomaml", "train_maml")},
    **{name: "distmaml.meta" for name in ("MAML", "Inner", "MetaGradient", "TaskBatch", "WeightDecay",
                                          "functional_forward", "make_method", "make_rule", "meta_gradient",
                                          "meta_gradient_loop", "meta_loss", "meta_parameters", "unroll")},
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    # Loaded on first use, so that `import distmaml.meta` stays free of the trainer's imports.
    if name not in _HOMES:
        raise AttributeError(f"module 'distmaml' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value
