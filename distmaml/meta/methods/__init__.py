"""Hypergradient methods: how phi's gradient is computed, as objects like the inner rules.

    second_order       autograd through every inner step (exact for the unrolled objective)
    truncated          through the last T steps (Shaban et al. 2019)
    first_order        through none (FOMAML)
    implicit           implicit function theorem, conjugate gradient (iMAML, hyperparameters)
    neumann            implicit function theorem, truncated Neumann series (Lorraine et al. 2020)
    finite_difference  the last step's second derivatives by central differences (DARTS, SAMA)
    reptile            phi - w_K (Nichol et al. 2018)

`make_method(name, **settings)` builds one; each takes the settings it needs. Your own is any
object following distmaml.meta.methods.base.Method.
"""

from distmaml.meta.methods.base import Method, MethodError
from distmaml.meta.methods.finite_difference import FiniteDifference
from distmaml.meta.methods.implicit import ImplicitCG, Neumann, batched_cg, neumann_series, safeguarded_descent
from distmaml.meta.methods.reptile import Reptile
from distmaml.meta.methods.unrolled import FirstOrder, SecondOrder, Truncated, unrolled_objective

_BUILDERS = {
    "second_order": lambda s: SecondOrder(),
    "first_order": lambda s: FirstOrder(),
    "truncated": lambda s: Truncated(s.get("truncate", 1)),
    "implicit": lambda s: ImplicitCG(s.get("damping", 0.0), s.get("safeguard", False), s.get("stop_early", True),
                                     s.get("cg_steps", 5), s.get("cg_tol", 1e-10)),
    "neumann": lambda s: Neumann(s.get("damping", 0.0), s.get("safeguard", False), s.get("stop_early", True),
                                 s.get("terms", 20), s.get("alpha", 0.1)),
    "finite_difference": lambda s: FiniteDifference(s.get("eps", 0.01)),
    "reptile": lambda s: Reptile(),
}
METHODS = tuple(_BUILDERS)


def make_method(name: str, **settings) -> Method:
    """The method called `name` (one of METHODS) with the settings it takes from `settings`:
    truncate; damping, safeguard, stop_early (implicit, neumann); cg_steps, cg_tol; terms, alpha; eps."""
    if name not in _BUILDERS:
        raise MethodError("inner.mode", name, f"must be one of {', '.join(METHODS)}, or an import path")
    return _BUILDERS[name](settings)


__all__ = ["METHODS", "FiniteDifference", "FirstOrder", "ImplicitCG", "Method", "MethodError", "Neumann", "Reptile",
           "SecondOrder", "Truncated", "batched_cg", "make_method", "neumann_series", "safeguarded_descent",
           "unrolled_objective"]
