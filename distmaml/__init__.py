"""distmaml: exact, batched, distributed MAML.

The building blocks, under the names the MAML literature uses:

- functional_forward(model, params, x): the model as a function of an explicit parameter dict
- inner_loop(model, params, support_x, support_y, inner_lr, inner_steps, mode=...): one task's adaptation
- meta_loss(...) / meta_gradient(...): a batch of tasks at once (vmap), in any meta-gradient mode
- test_adaptation(...): one task's query loss after 0..S inner steps
- train(config): the whole meta-training run that `distmaml train` performs
"""

from distmaml.config import Config, ConfigError, load_config
from distmaml.evaluate import test_adaptation
from distmaml.meta import (MetaGradient, functional_forward, inner_loop, meta_gradient, meta_gradient_loop,
                           meta_loss)
from distmaml.models import MLP
from distmaml.tasks import TaskBatch
from distmaml.tasks.sine import SineTasks
# `train` the function takes the place of the submodule's name: `from distmaml.train import ...`
# still reaches the module.
from distmaml.train import train  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "MLP", "Config", "ConfigError", "MetaGradient", "SineTasks", "TaskBatch", "functional_forward",
    "inner_loop", "load_config", "meta_gradient", "meta_gradient_loop", "meta_loss", "test_adaptation", "train",
]
