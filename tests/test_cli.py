"""The command line: flags validated as the settings they stand for, and one line for every error.

In this process (distmaml.cli.main returns the exit status and prints what the command prints); the
tests that need a fresh interpreter (signals, a second process, `python -m distmaml`) use run_cli."""

import pytest
import torch

from distmaml import cli
from conftest import REPO


def distmaml(capsys, *argv):
    """`distmaml ARGV` in this process: (exit status, stdout, stderr)."""
    code = cli.main([str(arg) for arg in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("flags, expected", [
    (["--query", "0"], "--query: eval.query = 0: must be >= 1"),
    (["--tasks", "1"], "--tasks: eval.tasks = 1: must be >= 2"),
    (["--shots", "0"], "--shots: eval.shots = 0: must be >= 1"),
    (["--steps", "-1"], "--steps: eval.steps = -1: must be >= 0"),
])
def test_eval_flags_are_checked_like_the_settings_they_stand_for(sine_run, capsys, flags, expected):
    assert distmaml(capsys, "eval", sine_run, *flags) == (2, "", f"distmaml eval: error: {expected}\n")


def test_study_steps_are_checked(tmp_path, capsys):
    assert distmaml(capsys, "study", "inner-steps", REPO / "configs/sine_debug.yaml", "--steps", "1", "-1", "--out",
                    tmp_path) == (2, "", "distmaml study: error: --steps: inner.steps = -1: must be >= 0\n")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line(tmp_path, capsys):
    code, _, err = distmaml(capsys, "train", REPO / "configs/sine_debug.yaml", f"run.dir={tmp_path}",
                            "engine.device=cuda")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("distmaml train: error: engine.device = 'cuda': this machine has no CUDA device")


def test_an_empty_config_file_runs_nothing(tmp_path, capsys, monkeypatch):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    monkeypatch.chdir(tmp_path)
    assert distmaml(capsys, "train", empty) == (
        2, "", f"distmaml train: error: {empty}: the file holds no settings (empty, or only comments)\n")
    assert not (tmp_path / "runs").exists()
