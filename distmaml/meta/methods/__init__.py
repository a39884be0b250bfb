"""Hypergradient methods: how phi's gradient is computed, as objects like the inner rules.

    second_order       autograd through every inner step (exact for the unrolled objective)
    truncated          through the last T steps (Shaban et al. 2019)
    first_order        through none (FOMAML)
    implicit           implicit function theorem, conjugate gradient: Implicit(CG(...)) (iMAML, hyperparameters)
    neumann            the same, truncated Neumann series: Implicit(NeumannSeries(...)) (Lorraine et al. 2020)
    finite_difference  the last step's second derivatives by central differences (DARTS, SAMA)
    reptile            phi - w_K (Nichol et al. 2018)
    es                 antithetic evolution strategies: over the episode, or truncated ES online
    pes                persistent evolution strategies on online runs (Vicol et al. 2021)

`make_method(name, **settings)` builds one from its class, passing the settings through
(`method_settings(name)` lists them); each method is a frozen dataclass whose fields are its
settings, checked when it is made. Implicit's settings are its own (damping, safeguard: shared by
every solve) and its solver's (CG: cg_steps, cg_tol, stop_early; NeumannSeries: terms, alpha).
Your own is any object following distmaml.meta.methods.base.Method.
"""

import dataclasses

from distmaml.meta.methods.base import Method, MethodError
from distmaml.meta.methods.evolution import ES, PES
from distmaml.meta.methods.finite_difference import FiniteDifference
from distmaml.meta.methods.implicit import (CG, Implicit, ImplicitCG, Neumann, NeumannSeries, Solver, batched_cg,
                                            neumann_series, safeguarded_descent)
from distmaml.meta.methods.reptile import Reptile
from distmaml.meta.methods.unrolled import FirstOrder, SecondOrder, Truncated, unrolled_objective

# name -> (the method's class, the solver class its settings partly go to, if any)
_BUILT_IN = {
    "second_order": (SecondOrder, None),
    "first_order": (FirstOrder, None),
    "truncated": (Truncated, None),
    "implicit": (Implicit, CG),
    "neumann": (Implicit, NeumannSeries),
    "finite_difference": (FiniteDifference, None),
    "reptile": (Reptile, None),
    "es": (ES, None),
    "pes": (PES, None),
}
METHODS = tuple(_BUILT_IN)


def method_settings(name: str) -> dict[str, str | None]:
    """The settings make_method(name, ...) takes, each with the config key that sets it (None: set
    by the trainer, not by a key of its own: CG's stop_early follows engine.cuda_graph)."""
    if name not in _BUILT_IN:
        raise MethodError("inner.mode", name, f"must be one of {', '.join(METHODS)}, or an import path")
    method, solver = _BUILT_IN[name]
    return {**method.setting_keys, **(solver.setting_keys if solver else {})}


def make_method(name: str, **settings) -> Method:
    """The method called `name` (one of METHODS), built from its class with `settings` passed through:
    make_method("neumann", terms=40, damping=0.1) is Implicit(NeumannSeries(terms=40), damping=0.1).
    A setting left out keeps the class's default; one the method does not take is refused in one line
    naming those it does (method_settings)."""
    keys = method_settings(name)
    method, solver = _BUILT_IN[name]
    unknown = sorted(set(settings) - set(keys))
    if unknown:
        raise MethodError(f"{name}.{unknown[0]}", settings[unknown[0]], f"is not a setting of the {name} method "
                          f"(its settings: {', '.join(keys) or 'none'})")
    if solver is None:
        return method(**settings)
    solver_fields = {field.name for field in dataclasses.fields(solver)}
    solve = solver(**{key: value for key, value in settings.items() if key in solver_fields})
    return method(solve, **{key: value for key, value in settings.items() if key not in solver_fields})


__all__ = ["CG", "ES", "METHODS", "PES", "FiniteDifference", "FirstOrder", "Implicit", "ImplicitCG", "Method", "MethodError",
           "Neumann", "NeumannSeries", "Reptile", "SecondOrder", "Solver", "Truncated", "batched_cg", "make_method",
           "method_settings", "neumann_series", "safeguarded_descent", "unrolled_objective"]
