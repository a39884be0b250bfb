"""distmaml: exact, batched, distributed MAML.

The building blocks, under the names the MAML literature uses:

- functional_forward(model, params, x): the model as a function of an explicit parameter dict
- Inner(rule=make_rule(...), steps=K, mode=...): how each task adapts (rules: sgd, meta_sgd, lslr,
  momentum, adam; modes: second_order, first_order, truncated, implicit, reptile)
- adapt(...) / meta_loss(...) / meta_gradient(...): a batch of tasks at once (vmap), in any mode
- inner_loop, outer_loop_loss, train_maml, train_fomaml, test_adaptation: the MAML write-up's names
- train(config): the whole meta-training run that `distmaml train` performs
"""

from distmaml.config import Config, ConfigError, load_config
from distmaml.meta import (Inner, MetaGradient, TaskBatch, adapt, functional_forward, make_rule, meta_gradient,
                           meta_gradient_loop, meta_loss)
from distmaml.models import MLP
from distmaml.tasks.sine import SineTasks
# `train` the function takes the place of the submodule's name: `from distmaml.train import ...`
# still reaches the module.
from distmaml.train import train  # noqa: E402
from distmaml.writeup import inner_loop, outer_loop_loss, test_adaptation, train_fomaml, train_maml  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "MLP", "Config", "ConfigError", "Inner", "MetaGradient", "SineTasks", "TaskBatch", "adapt", "functional_forward",
    "inner_loop", "load_config", "make_rule", "meta_gradient", "meta_gradient_loop", "meta_loss", "outer_loop_loss",
    "test_adaptation", "train", "train_fomaml", "train_maml",
]
