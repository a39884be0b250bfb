"""distmaml: exact, batched, distributed MAML."""

from distmaml.meta import functional_forward, inner_loop, meta_gradient, meta_gradient_loop, meta_loss

__version__ = "0.1.0"

__all__ = ["functional_forward", "inner_loop", "meta_gradient", "meta_gradient_loop", "meta_loss"]
