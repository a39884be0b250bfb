"""The implicit.* settings: their one-line errors and the iMAML sine config."""

from __future__ import annotations

from pathlib import Path

import pytest

from distmaml.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


@pytest.mark.parametrize("override, message", [
    ("implicit.lam=0", "command line: implicit.lam = 0.0: must be > 0"),
    ("implicit.lam=-1.5", "command line: implicit.lam = -1.5: must be > 0"),
    ("implicit.lam=.inf", "command line: implicit.lam = inf: must be a finite number"),
    ("implicit.cg_steps=0", "command line: implicit.cg_steps = 0: must be >= 1"),
    ("implicit.cg_damping=-0.1", "command line: implicit.cg_damping = -0.1: must be >= 0"),
    ("implicit.cg_tol=-0.001", "command line: implicit.cg_tol = -0.001: must be >= 0"),
    ("implicit.cg_steps=2.5", "command line: implicit.cg_steps = 2.5: expected int"),
    ("implicit.inner_safeguard=2", "command line: implicit.inner_safeguard = 2: expected bool"),
])
def test_implicit_settings_are_checked_with_one_line_errors(override, message):
    with pytest.raises(ConfigError) as caught:
        load_config(None, [override])
    assert str(caught.value) == message


def test_sine_imaml_config_selects_implicit_mode():
    config = load_config(CONFIGS / "sine_imaml.yaml")
    assert config.inner.mode == "implicit"
    assert (config.implicit.lam, config.implicit.cg_steps, config.implicit.cg_damping) == (5.0, 5, 3.0)
    assert (config.inner.steps, config.inner.lr) == (10, 0.01)
    assert config.implicit.inner_safeguard  # without it this config goes NaN near iteration 600
    assert not load_config(None, ["implicit.inner_safeguard=false"]).implicit.inner_safeguard
    assert (config.train.meta_batch, config.task.support, config.task.query, config.train.lr) == (25, 10, 10, 1e-3)
