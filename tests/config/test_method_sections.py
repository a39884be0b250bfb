"""The implicit methods' settings (implicit.*, neumann.*, maml.proximal): their one-line errors,
the refusals of what cannot work, and the iMAML sine config."""

from __future__ import annotations

from pathlib import Path

import pytest

from distmaml.build import build_inner
from distmaml.config import ConfigError, from_dict, load_config
from distmaml.meta import ImplicitCG, Inner, MethodError, Neumann, make_rule

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@pytest.mark.parametrize("override, message", [
    # iMAML's lam is the maml problem's proximal strength now; 0 is plain MAML (an implicit run
    # refuses it before training: see below). Its range is the problem's to check
    # (tests/config/test_problem_sections.py), its type the config's.
    ("maml.proximal=.inf", "command line: maml.proximal = inf: must be a finite number"),
    ("implicit.lam=5", "command line: unknown key 'implicit.lam' (moved to maml.proximal)"),
    ("implicit.cg_damping=3", "command line: unknown key 'implicit.cg_damping' (moved to implicit.damping (now added "
                              "to the inner Hessian itself: lam times the old value))"),
    ("implicit.cg_steps=0", "command line: implicit.cg_steps = 0: must be >= 1"),
    ("implicit.damping=-0.1", "command line: implicit.damping = -0.1: must be >= 0"),
    ("implicit.cg_tol=-0.001", "command line: implicit.cg_tol = -0.001: must be >= 0"),
    ("implicit.cg_steps=2.5", "command line: implicit.cg_steps = 2.5: expected int"),
    ("implicit.inner_safeguard=2", "command line: implicit.inner_safeguard = 2: expected bool"),
    ("neumann.terms=0", "command line: neumann.terms = 0: must be >= 1"),
    ("neumann.alpha=0", "command line: neumann.alpha = 0.0: must be > 0"),
    ("neumann.alpha=.nan", "command line: neumann.alpha = nan: must be a finite number"),
])
def test_implicit_settings_are_checked_with_one_line_errors(override, message):
    """By the config's loading (types, unknown keys) or by the method that owns the setting, as the
    inner loop is built (ranges), whichever method the run uses."""
    with pytest.raises(ConfigError) as caught:
        build_inner(load_config(None, [override]))
    assert str(caught.value) == message


LEARNED_RULE = ("differentiates the solution of the inner problem, which does not depend on learned step sizes: "
                "they would get no gradient")


@pytest.mark.parametrize("overrides, message", [
    (["inner.mode=implicit", "inner.rule=meta_sgd"], f"inner.rule = 'meta_sgd': implicit {LEARNED_RULE}"),
    (["inner.mode=neumann", "inner.rule=lslr"], f"inner.rule = 'lslr': neumann {LEARNED_RULE}"),
    (["inner.mode=implicit", "inner.rule=momentum", "inner.momentum=0.9"],
     "implicit.inner_safeguard = True: caps plain SGD steps; with inner.rule = momentum set "
     "implicit.inner_safeguard=false"),
    (["inner.mode=implicit", "inner.multi_step_loss=true"],
     "inner.multi_step_loss = True: needs a method that differentiates the unroll, not implicit"),
    (["inner.mode=neumann", "inner.first_order_iterations=3"],
     "inner.first_order_iterations = 3: anneals from first order to a method that differentiates inner steps "
     "(second_order, truncated), not neumann"),
])
def test_what_an_implicit_method_cannot_differentiate_is_refused_in_one_line(overrides, message):
    """By the method when an Inner is built, and by build_inner with where the value came from."""
    config = load_config(CONFIGS / "sine_debug.yaml", [*overrides, "maml.proximal=1.0"])
    with pytest.raises(ConfigError) as caught:
        build_inner(config)
    # A value left at its default is said to be one, not blamed on the source that set inner.mode.
    where = "command line, with implicit.inner_safeguard at its default" if "inner_safeguard = True" in message \
        else "command line"
    assert str(caught.value) == f"{where}: {message}"


def test_the_method_objects_refuse_the_same_rules_themselves():
    with pytest.raises(MethodError) as caught:
        Inner(make_rule("meta_sgd", 0.1), 3, ImplicitCG())
    assert str(caught.value) == f"inner.rule = 'meta_sgd': implicit {LEARNED_RULE}"
    with pytest.raises(MethodError) as caught:
        Inner(make_rule("momentum", 0.1, momentum=0.9), 3, Neumann(safeguard=True))
    assert str(caught.value) == ("implicit.inner_safeguard = True: caps plain SGD steps; with inner.rule = momentum "
                                 "set implicit.inner_safeguard=false")
    Inner(make_rule("momentum", 0.1, momentum=0.9), 3, Neumann(safeguard=False))  # any rule without learned sizes
    Inner(make_rule("adam", 0.1), 3, ImplicitCG(safeguard=False))


def test_an_implicit_run_without_a_proximal_term_is_refused_before_training(tmp_path):
    """Without maml.proximal > 0 the inner loss, and so its solution, does not depend on phi: the
    implicit gradient would be zero. Refused on the first task, before any iteration."""
    from distmaml.commands.train import train

    config = load_config(CONFIGS / "sine_debug.yaml", ["inner.mode=implicit", f"run.dir={tmp_path}",
                                                       "logging.progress=false"])
    with pytest.raises(ConfigError) as caught:
        train(config)
    assert str(caught.value) == (
        "command line: inner.mode = 'implicit': differentiates the solution of the inner problem, and MAML's inner "
        "loss does not depend on phi, so neither does its solution: set maml.proximal > 0 (iMAML's lam)")
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()


def test_sine_imaml_config_selects_implicit_mode():
    config = load_config(CONFIGS / "sine_imaml.yaml")
    assert config.inner.mode == "implicit" and config.problem.name == "maml"
    assert (config.maml.proximal, config.implicit.cg_steps, config.implicit.damping) == (5.0, 5, 15.0)
    assert (config.inner.steps, config.inner.lr) == (10, 0.01)
    assert config.implicit.inner_safeguard  # without it this config goes NaN near iteration 600
    assert not load_config(None, ["implicit.inner_safeguard=false"]).implicit.inner_safeguard
    assert (config.train.meta_batch, config.task.support, config.task.query, config.train.lr) == (25, 10, 10, 1e-3)
    inner = build_inner(config)
    assert inner.method == ImplicitCG(damping=15.0, safeguard=True, stop_early=True, cg_steps=5, cg_tol=1e-10)
    assert (inner.rule.name, inner.rule.lr, inner.steps) == ("sgd", 0.01, 10)


def test_an_old_implicit_config_is_migrated_to_the_same_system():
    """Version 0.1 kept lam in implicit.lam and damped I + H/lam by cg_damping d; today the damping is
    added to H + lam I, so d becomes lam * d: the sine iMAML config's old (5, 3) is today's (5, 15)."""
    old = {"inner": {"mode": "implicit"}, "implicit": {"lam": 5.0, "cg_steps": 5, "cg_damping": 3.0}}
    config = from_dict(old, "old.pt")
    assert (config.maml.proximal, config.implicit.damping, config.implicit.cg_steps) == (5.0, 15.0, 5)
    assert build_inner(config).method == build_inner(load_config(CONFIGS / "sine_imaml.yaml")).method
