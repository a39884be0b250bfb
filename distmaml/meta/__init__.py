"""The mathematics of MAML as pure functions: tensors in, tensors out, no processes, files or logs."""

from distmaml.meta.batched import MetaGradient, adapt, meta_gradient, meta_loss, sgd_step, task_losses
from distmaml.meta.checkpointing import CHECKPOINTS, plan_segments
from distmaml.meta.functional import MODES, detached, differentiated_steps, functional_forward
from distmaml.meta.implicit import implicit_meta_gradient, implicit_meta_gradient_loop, regularised_adapt
from distmaml.meta.reference import inner_loop, meta_gradient_loop

__all__ = [
    "CHECKPOINTS", "MODES", "MetaGradient", "adapt", "detached", "differentiated_steps", "functional_forward",
    "implicit_meta_gradient", "implicit_meta_gradient_loop", "inner_loop", "meta_gradient", "meta_gradient_loop",
    "meta_loss", "plan_segments", "regularised_adapt", "sgd_step", "task_losses",
]
