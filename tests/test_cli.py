"""The command line: flags validated as the settings they stand for, and one line for every error."""

import pytest

from conftest import REPO, run_cli


@pytest.fixture(scope="module")
def sine_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("sine")
    run_cli(["train", "configs/sine_debug.yaml", f"run.dir={run}", "train.iterations=5", "eval.at_end=false"])
    return run


@pytest.mark.parametrize("flags, expected", [
    (["--query", "0"], "--query: eval.query = 0: must be >= 1"),
    (["--tasks", "1"], "--tasks: eval.tasks = 1: must be >= 2"),
    (["--shots", "0"], "--shots: eval.shots = 0: must be >= 1"),
    (["--steps", "-1"], "--steps: eval.steps = -1: must be >= 0"),
])
def test_eval_flags_are_checked_like_the_settings_they_stand_for(sine_run, flags, expected):
    proc = run_cli(["eval", str(sine_run), *flags], check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"distmaml eval: error: {expected}"
    assert proc.stdout == ""


def test_study_steps_are_checked(tmp_path):
    proc = run_cli(["study", "inner-steps", "configs/sine_debug.yaml", "--steps", "1", "-1", "--out", str(tmp_path)],
                   check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "distmaml study: error: --steps: inner.steps = -1: must be >= 0"


def test_cuda_without_cuda_is_one_line(tmp_path):
    proc = run_cli(["train", "configs/sine_debug.yaml", f"run.dir={tmp_path}", "engine.device=cuda"], check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("distmaml train: error: engine.device = 'cuda': this machine has no CUDA device")


def test_an_empty_config_file_runs_nothing(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    proc = run_cli(["train", str(empty)], check=False, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"distmaml train: error: {empty}: the file holds no settings (empty, or only comments)"
    assert not (tmp_path / "runs").exists()
