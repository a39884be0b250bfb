"""The mathematics of MAML as pure functions: tensors in, tensors out, no processes, files or logs.

    inner = Inner(rule=make_rule("meta_sgd", lr=0.01), steps=5, mode="second_order")
    result = meta_gradient(model, theta, batch, inner)      # theta: weights and learned step sizes
"""

from distmaml.meta.adapt import Adapted, Inner, adapt, split, task_losses
from distmaml.meta.checkpointing import CHECKPOINTS, plan_segments
from distmaml.meta.functional import (MODES, LossFn, MetaGradient, Params, TaskBatch, detached, differentiated_steps,
                                      functional_forward, mse)
from distmaml.meta.gradient import meta_gradient, meta_loss, reptile_meta_gradient
from distmaml.meta.implicit import implicit_meta_gradient, implicit_meta_gradient_loop, regularised_adapt
from distmaml.meta.reference import inner_loop, meta_gradient_loop, reference_adapt
from distmaml.meta.rules import LEARNED, RULES, Rule, learned_names, make_rule

__all__ = [
    "CHECKPOINTS", "LEARNED", "MODES", "RULES", "Adapted", "Inner", "LossFn", "MetaGradient", "Params", "Rule",
    "TaskBatch", "adapt", "detached", "differentiated_steps", "functional_forward", "implicit_meta_gradient",
    "implicit_meta_gradient_loop", "inner_loop", "learned_names", "make_rule", "meta_gradient", "meta_gradient_loop",
    "meta_loss", "mse", "plan_segments", "reference_adapt", "regularised_adapt", "reptile_meta_gradient", "split",
    "task_losses",
]
