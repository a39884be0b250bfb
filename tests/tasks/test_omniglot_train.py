"""End to end: configs/omniglot_debug.yaml trains on real Omniglot on a CPU and adapts to held-out
characters well above chance (20% for 5 ways)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from distmaml.commands.train import train  # the core trainer: a broken import fails the suite, never skips it
from distmaml.config import load_config

REPO = Path(__file__).resolve().parents[2]
REAL_ROOT = Path(os.environ.get("DISTMAML_OMNIGLOT") or REPO.parent / "shared/data/omniglot")


@pytest.mark.slow
def test_debug_config_learns_real_omniglot(tmp_path, omniglot_cache):
    if not (REAL_ROOT / "images_background.zip").is_file() and not (REAL_ROOT / "images_background").is_dir():
        pytest.skip(f"real Omniglot not found at {REAL_ROOT} (set DISTMAML_OMNIGLOT to its folder)")
    config = load_config(REPO / "configs/omniglot_debug.yaml", [
        f"data.root={REAL_ROOT}", f"data.cache_dir={omniglot_cache(REAL_ROOT)}", f"run.dir={tmp_path / 'run'}",
        "logging.progress=false", "engine.device=cpu"])
    summary = train(config)
    # One row per number of inner steps 0..eval.steps on held-out characters.
    before, after = summary["eval"]["steps"][0], summary["eval"]["steps"][-1]
    assert before["accuracy"] < 0.3 and after["accuracy"] >= 0.6, summary["eval"]
