"""The command line: flags validated as the settings they stand for, and one line for every error.

In this process (distmaml.commands.cli.main returns the exit status and prints what the command prints); the
tests that need a fresh interpreter (signals, a second process, `python -m distmaml`) use run_cli."""

import json
import re

import pytest
import torch

from distmaml.commands import cli
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


# ------------------------------------------------------------------ every path ends in one line, in-process


def one_line(capsys, command):
    """(exit status, the one line on stderr, stdout) of `distmaml <command>` run in this process."""
    code = cli.main(command)
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) <= 1 and "Traceback" not in err, err
    return code, lines[0] if lines else "", out


@pytest.mark.parametrize("flags, expected", [
    (["--tasks", "1000000000"], r"--tasks = 1000000000, --query = 100: evaluating needs about .* of it for the "
                                r"results of 1000000000 tasks\), more than the .* available \(.*\); fewer --tasks would "
                                r"fit, or engine.memory_check=false skips this check"),
    (["--query", "1000000000"], r"--tasks = 50, --query = 1000000000: evaluating needs about .* of it for each chunk "
                                r"of up to 200 tasks with their examples\), .*; fewer --shots or --query would fit"),
    (["--shots", "1000000000"], r"--tasks = 50, --shots = 1000000000, --query = 100: evaluating needs about "),
    (["--device", "gpu"], r"--device: engine.device = 'gpu': must be auto, cpu, cuda or cuda:N$"),
])
def test_eval_refuses_what_would_not_fit_or_cannot_run_before_evaluating(sine_run, capsys, flags, expected):
    code, line, out = one_line(capsys, ["eval", str(sine_run), *flags])
    assert code == 2 and re.match(f"distmaml eval: error: {expected}", line), line
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_eval_on_cuda_without_cuda_is_one_line(sine_run, capsys):
    code, line, _ = one_line(capsys, ["eval", str(sine_run), "--device", "cuda"])
    assert code == 2 and line == (f"distmaml eval: error: --device = 'cuda': this machine has no CUDA device (torch "
                                  f"{torch.__version__}); use --device cpu")


def test_eval_checks_its_json_path_before_the_work(sine_run, capsys, tmp_path, read_only_folder):
    code, line, out = one_line(capsys, ["eval", str(sine_run), "--tasks", "4", "--json", str(tmp_path)])
    assert (code, line, out) == (2, f"distmaml eval: error: --json = {tmp_path}: is a directory; give a file name", "")
    code, line, out = one_line(capsys, ["eval", str(sine_run), "--tasks", "4", "--json",
                                        str(read_only_folder / "eval.json")])
    assert code == 2 and out == ""
    assert line.startswith(f"distmaml eval: error: --json = {read_only_folder / 'eval.json'}: cannot create files in "
                           f"{read_only_folder} (")
    # A folder that does not exist yet is made, as for every other file distmaml writes.
    deep = tmp_path / "new" / "folder" / "eval.json"
    assert one_line(capsys, ["eval", str(sine_run), "--tasks", "4", "--json", str(deep)])[0] == 0
    assert json.loads(deep.read_text())["tasks"] == 4


def test_plot_checks_its_output_and_tasks_before_the_work(sine_run, capsys, tmp_path, read_only_folder):
    for out, tasks, expected in [
        (tmp_path / "fig.txt", 3, f"OUT = {tmp_path / 'fig.txt'}: .txt is not an image format matplotlib writes (it "
                                  "writes .avif, .eps, "),
        (read_only_folder / "fig.png", 3, f"OUT = {read_only_folder / 'fig.png'}: cannot create files in "),
        (tmp_path, 3, f"OUT = {tmp_path}: is a directory; give a file name"),
        (tmp_path / "fig.png", 0, "--tasks = 0: must be between 1 and 120 (one panel per task, side by side)"),
        (tmp_path / "fig.png", 100000, "--tasks = 100000: must be between 1 and 120 (one panel per task, side by side)"),
    ]:
        code, line, printed = one_line(capsys, ["plot", str(sine_run), str(out), "--tasks", str(tasks)])
        assert code == 2 and line.startswith(f"distmaml plot: error: {expected}"), line
        assert printed == "" and not (tmp_path / "fig.png").exists()
    # Without an extension: a PNG under exactly the name given, and the name said is the name written.
    code, line, printed = one_line(capsys, ["plot", str(sine_run), str(tmp_path / "fig"), "--tasks", "1"])
    assert code == 0 and printed == f"wrote {tmp_path / 'fig'} (PNG)\n"
    assert (tmp_path / "fig").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (tmp_path / "fig.png").exists()


def test_study_checks_its_out_folder_before_training(capsys, tmp_path, read_only_folder):
    config = str(REPO / "configs/sine_debug.yaml")
    (tmp_path / "taken").write_text("")
    for out, expected in [(tmp_path / "taken", f"--out = {tmp_path / 'taken'}: exists and is not a directory"),
                          (read_only_folder / "study", f"--out = {read_only_folder / 'study'}: cannot create files in "
                                                       f"{read_only_folder} (")]:
        for study in (["seeds", config, "--seeds", "0"], ["inner-steps", config, "--steps", "1"]):
            code, line, printed = one_line(capsys, ["study", *study, "--out", str(out)])
            assert code == 2 and line.startswith(f"distmaml study: error: {expected}"), line
            assert printed == ""


def test_a_seeds_study_evaluation_that_would_not_fit_is_refused_before_training(capsys, tmp_path):
    code, line, _ = one_line(capsys, ["study", "seeds", str(REPO / "configs/sine_debug.yaml"), "--tasks", "1000000000",
                                      "--out", str(tmp_path)])
    assert code == 2 and line.startswith("distmaml study: error: --tasks = 1000000000, --shots = 5, eval.query = 100: "
                                         "evaluating needs about ")
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ training runs: no shots; steps past the trained ones


@pytest.fixture(scope="module")
def schedule_run(tmp_path_factory):
    """test_evaluate.SCHEDULE_RUN trained in this process: a learned schedule of 3 inner steps on logistic runs."""
    from distmaml.commands.train import train
    from distmaml.config import load_config
    from test_evaluate import SCHEDULE_RUN

    run = tmp_path_factory.mktemp("schedule_run")
    train(load_config(REPO / "configs/logistic_weight_decay.yaml", [*SCHEDULE_RUN, f"run.dir={run}"]))
    return run


def test_shots_and_query_of_training_runs_are_refused_before_the_work(schedule_run, capsys, tmp_path):
    """Failed before: eval --shots / --query were accepted and ignored, plot --shots too."""
    why = "the tasks of family logistic are training runs on a fixed data set, not few-shot tasks; they have no"
    for command, expected in [
        (["eval", schedule_run, "--shots", "5"], f"distmaml eval: error: --shots = 5: {why} shots"),
        (["eval", schedule_run, "--query", "3", "--json", tmp_path / "eval.json"],
         f"distmaml eval: error: --query = 3: {why} query set to size"),
        (["plot", schedule_run, tmp_path / "fig.png", "--shots", "5"],
         f"distmaml plot: error: --shots = 5: {why} shots"),
    ]:
        assert one_line(capsys, [str(arg) for arg in command]) == (2, expected, "")
    assert list(tmp_path.iterdir()) == []


def test_a_training_run_evaluation_says_what_it_evaluated_and_what_steps_past_the_schedule_use(schedule_run, capsys,
                                                                                               tmp_path):
    """Failed before: the header said "20-shot" and the JSON "shots": 20; steps 4-5 ran without a word."""
    code, out, err = distmaml(capsys, "eval", schedule_run, "--steps", "5", "--json", tmp_path / "eval.json")
    result = json.loads((tmp_path / "eval.json").read_text())
    assert code == 0 and result["shots"] is None and result["training_examples"] == 20
    assert out.splitlines()[0].endswith(": 4 fresh training runs of 5 inner steps on a data set of 20 training "
                                        "examples, inner rule schedule (lr 1.0)") and "shot" not in out
    rate = result["learned"]["learning_rate"]
    assert result["beyond_trained_steps"] == (f"steps 4–5 use the schedule's one learned rate, {rate:.3g}, learned "
                                              "for steps 1–3")
    assert err == f"distmaml eval: warning: {result['beyond_trained_steps']}\n"
    code, out, err = distmaml(capsys, "eval", schedule_run)  # the steps it was trained for: nothing to say
    assert code == 0 and err == "" and ": 4 fresh training runs of 3 inner steps on " in out


def test_a_seeds_study_of_training_runs_refuses_shots_before_training(capsys, tmp_path):
    """Failed before: --shots (default 5 10) was accepted, and gave identical "5" and "10" rows."""
    from test_evaluate import SCHEDULE_RUN

    config = str(REPO / "configs/logistic_weight_decay.yaml")
    why = "the tasks of family logistic are training runs on a fixed data set, not few-shot tasks; they have no"
    for extra, expected in [(["--shots", "5", "10"], f"--shots = 5 10: {why} shots"),
                            (["eval.query=3"], f"eval.query = 3: {why} query set to size")]:
        code, line, out = one_line(capsys, ["study", "seeds", config, *SCHEDULE_RUN, *extra, "--out", str(tmp_path)])
        assert (code, line, out) == (2, f"distmaml study: error: {expected}", "")
    assert list(tmp_path.iterdir()) == []
