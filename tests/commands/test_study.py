import json

from distmaml.commands.study import run_inner_steps_study
from distmaml.commands.study.inner_steps import format_row
from distmaml.config import load_config
from conftest import REPO, run_cli, run_dir_held_by_another_process


def test_inner_steps_study_reports_the_numbers_each_run_wrote(tmp_path):
    rows = run_inner_steps_study(REPO / "configs/sine_debug.yaml", tmp_path, steps=[1, 3],
                                 modes=["second_order", "first_order"], iterations=30,
                                 overrides=["eval.tasks=20", "train.log_every=10"])
    assert [(r["mode"], r["inner_steps"]) for r in rows] == [
        ("second_order", 1), ("second_order", 3), ("first_order", 1), ("first_order", 3)]
    table = (tmp_path / "study.md").read_text().splitlines()
    assert table[0] == "30 meta-iterations per run." and len(table) == 2 + 2 + 4
    for row, line in zip(rows, table[4:]):
        # Each row is its own run's: trained with its mode and K (second order with activation
        # checkpointing), evaluated after its K steps, its numbers those of that run's summary.json.
        run = tmp_path / f"{row['mode']}_k{row['inner_steps']}"
        config = load_config(run / "config.yaml")
        assert (config.inner.mode, config.inner.steps, config.train.iterations) == (row["mode"], row["inner_steps"], 30)
        assert config.inner.checkpoint == ("auto" if row["mode"] == "second_order" else "none")
        summary = json.loads((run / "summary.json").read_text())
        after = summary["eval"]["steps"][-1]
        assert after["step"] == row["inner_steps"] and summary["iteration"] == 30
        assert row == {"mode": row["mode"], "inner_steps": row["inner_steps"], "status": summary["status"],
                       "diverged_at": summary.get("diverged_at"), "query_mse": after["loss"],
                       "query_mse_ci95": after["loss_ci95"], "query_mse_median": after["loss_median"],
                       "diverged": after["diverged"], "support_mse": after["support_loss"],
                       "seconds_per_iteration": summary["seconds_per_iteration"],
                       "peak_memory_mb": summary["peak_memory_mb"]}
        assert line == format_row(row)
    assert len({row["query_mse"] for row in rows}) == 4  # four runs, four results
    assert all(row["status"] == "complete" for row in rows)
    assert json.loads((tmp_path / "study.json").read_text()) == rows
    assert (tmp_path / "study.png").read_bytes()[:4] == b"\x89PNG"


def test_seeds_study_reports_each_seed_s_own_run_evaluated_on_the_same_tasks(tmp_path):
    from distmaml.commands.study import run_seeds_study
    from distmaml.evaluate import evaluate, evaluation_settings
    from distmaml.run.restore import load_trained

    report = run_seeds_study(REPO / "configs/sine_debug.yaml", tmp_path, seeds=[0, 1], threads=[1], shots=[5, 10],
                             steps=3, tasks=20, jobs=2, overrides=["train.iterations=30", "train.log_every=10"])
    assert [(run["seed"], run["threads"]) for run in report["runs"]] == [(0, 1), (1, 1)]
    for run in report["runs"]:
        run_dir = tmp_path / f"threads1_seed{run['seed']}"
        assert load_config(run_dir / "config.yaml").train.seed == run["seed"]
        # What the run logged while training...
        logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [m["iteration"] for m in logged] == [10, 20, 30]
        assert (run["meta_loss_first"], run["meta_loss_last"]) == (logged[0]["meta_loss"], logged[-1]["meta_loss"])
        assert run["sharpness"] == [(m["iteration"], m["sharpness"]) for m in logged]
        assert all(value > 0 for _, value in run["sharpness"])
        # ...and its final weights evaluated again here on the study's tasks: the same numbers.
        config, learner, _ = load_trained(run_dir)
        again = evaluate(learner.problem, learner.theta, learner.family, learner.inner,
                         **{**evaluation_settings(config), "steps": 3, "tasks": 20, "shots": 5})
        assert run["eval"]["5"] == json.loads(json.dumps(again))
    seed0, seed1 = (run["eval"]["5"]["steps"][0]["loss"] for run in report["runs"])
    assert seed0 != seed1  # different weights
    for count in ("5", "10"):
        for step, row in enumerate(report["over_runs"][count]):
            assert row["mean"] == (report["runs"][0]["eval"][count]["steps"][step]["loss"]
                                   + report["runs"][1]["eval"][count]["steps"][step]["loss"]) / 2
    assert json.loads((tmp_path / "seeds.json").read_text())["over_runs"]["10"][3]["diverged_tasks"] == 0
    table = (tmp_path / "seeds.md").read_text()
    assert "| 5 | " in table and "| 10 | " in table and "| 1 | 1 | " in table
    assert (tmp_path / "seeds.png").read_bytes()[:4] == b"\x89PNG"


def test_a_failed_training_run_stops_the_study_in_one_line(tmp_path):
    # Another trainer holds the first run's directory: its `distmaml train` is refused, so the study is.
    run_dir = tmp_path / "threads1_seed0"
    run_dir.mkdir()
    with run_dir_held_by_another_process(run_dir):
        proc = run_cli(["study", "seeds", str(REPO / "configs/sine_debug.yaml"), "train.iterations=5", "--seeds", "0",
                        "--tasks", "2", "--steps", "1", "--out", str(tmp_path)], check=False)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("distmaml study: error: study run `distmaml train ")
    assert "in use by another trainer" in lines[0] and "run0.log" in lines[0]


def test_a_run_that_diverged_is_shown_as_diverged_and_the_study_goes_on(tmp_path):
    """Its `distmaml train` exits 1 (a diverged run is never "complete"); the study reports it, not its
    last good checkpoint, and the statistics over runs say "diverged"."""
    from distmaml.commands.study import run_seeds_study
    from distmaml.commands.study.seeds import format_report

    report = run_seeds_study(REPO / "configs/sine_debug.yaml", tmp_path / "seeds", seeds=[0], threads=[1], shots=[5],
                             steps=1, tasks=4, overrides=["train.iterations=5", "train.max_meta_loss=1e-6"])
    (run,) = report["runs"]
    assert run["status"] == "diverged" and run["diverged_at"] == 1 and run["eval"] is None
    assert run["error"].startswith("training diverged at iteration 1: the meta-loss ")
    assert [row["runs_with_divergence"] for row in report["over_runs"]["5"]] == [1, 1]
    table = format_report(report)
    assert "| 0 | 1 | diverged in training (iteration 1) |" in table and "| 5 | diverged (median diverged) |" in table
    json.loads((tmp_path / "seeds/seeds.json").read_text())
    rows = run_inner_steps_study(REPO / "configs/sine_debug.yaml", tmp_path / "steps", steps=[1], modes=["first_order"],
                                 iterations=5, overrides=["train.max_meta_loss=1e-6"])
    assert rows[0]["status"] == "diverged" and rows[0]["diverged_at"] == 1
    assert "| first_order | 1 | diverged in training (iteration 1) | diverged |" in \
        (tmp_path / "steps/study.md").read_text()


def test_a_seeds_study_of_training_runs_has_no_shot_rows_and_shows_the_steps_it_evaluated(tmp_path, monkeypatch):
    """Failed before: a study needed shots (5 and 10 by default: two identical rows) and showed the
    paper's 1, 5 and 10 steps whatever the run trained for. The runs train in this process here (how
    a study starts its processes is the other tests' business)."""
    from distmaml.commands.study import seeds
    from distmaml.commands.train import train
    from test_evaluate import SCHEDULE_RUN

    def train_here(config_path, runs, run_dirs, jobs=1, log_dir=None):
        return [train(load_config(config_path, overrides))["status"] for overrides in runs]

    monkeypatch.setattr(seeds, "train_runs", train_here)
    config = REPO / "configs/logistic_weight_decay.yaml"
    report = seeds.run_seeds_study(config, tmp_path, seeds=[0], threads=[1], tasks=4, overrides=SCHEDULE_RUN)
    (run,) = report["runs"]
    assert report["shots"] is None and report["steps"] == 3 and "--shots" not in report["command"]  # eval.steps
    assert run["eval"]["shots"] is None and [row["step"] for row in report["over_runs"]] == [0, 1, 2, 3]
    assert report["over_runs"][3]["mean"] == run["eval"]["steps"][3]["accuracy"]
    table = (tmp_path / "seeds.md").read_text()
    assert "shot" not in table and "Past the" not in table
    assert "fresh training runs of 3 inner steps" in table and "| 0 steps | 3 steps | diverged tasks" in table
    assert "| seed | threads | 3 steps | sharpness" in table
    # Past the trained steps (the finished run evaluated again, not retrained): those steps are shown, and said.
    report = seeds.run_seeds_study(config, tmp_path, seeds=[0], threads=[1], steps=5, tasks=4, overrides=SCHEDULE_RUN)
    note = report["runs"][0]["eval"]["beyond_trained_steps"]
    assert note.startswith("steps 4–5 use the schedule's one learned rate, ")
    table = (tmp_path / "seeds.md").read_text()
    assert "| 0 steps | 3 steps | 5 steps | diverged tasks" in table
    assert "| seed | threads | 3 steps | 5 steps |" in table
    assert f"Past the 3 inner steps the runs trained:\n- seed 0, 1 thread(s): {note}.\n" in table
