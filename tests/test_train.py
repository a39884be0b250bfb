"""End-to-end behaviour of the trainer in one process: learning, resume, checkpoints, errors."""

import json
import math

import pytest
import torch

from distmaml.checkpoint import list_checkpoints, load_checkpoint
from distmaml.config import ConfigError, load_config
from distmaml.train import learning_rate, train
from conftest import REPO, run_cli


def debug_config(tmp_path, *overrides):
    return load_config(REPO / "configs/sine_debug.yaml",
                       [f"run.dir={tmp_path}", "logging.progress=false", *overrides])


def final_state(run_dir):
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])


def test_short_training_lowers_post_adaptation_loss(tmp_path):
    untrained = train(debug_config(tmp_path / "a", "train.iterations=0"))
    trained = train(debug_config(tmp_path / "b"))
    before = untrained["eval"]["steps"][-1]["loss"]
    after = trained["eval"]["steps"][-1]["loss"]
    assert after < 0.6 * before, (before, after)
    # Adaptation itself helps the trained model: 10 steps beat 0 steps clearly.
    assert trained["eval"]["steps"][10]["loss"] < 0.8 * trained["eval"]["steps"][0]["loss"]
    lines = [json.loads(line) for line in (tmp_path / "b/metrics.jsonl").read_text().splitlines()]
    assert [m["iteration"] for m in lines] == list(range(50, 401, 50))
    for key in ("iteration", "meta_loss", "query_loss_before", "query_loss_after", "tasks_per_s"):
        assert all(math.isfinite(m[key]) for m in lines), key
    assert lines[-1]["meta_loss"] < lines[0]["meta_loss"]
    summary = json.loads((tmp_path / "b/summary.json").read_text())
    assert summary["status"] == "complete" and summary["iteration"] == 400
    assert load_config(tmp_path / "b/config.yaml").train.iterations == 400  # the resolved config


@pytest.mark.parametrize("mode", ["second_order", "first_order"])
def test_resume_is_bit_exact(tmp_path, mode):
    common = [f"inner.mode={mode}", "inner.steps=2", "train.checkpoint_every=0", "eval.at_end=false",
              "train.grad_clip=1.0", "train.log_every=7"]
    train(debug_config(tmp_path / "straight", "train.iterations=40", *common))
    train(debug_config(tmp_path / "split", "train.iterations=17", *common))
    train(debug_config(tmp_path / "split", "train.iterations=40", *common))
    straight, split = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert straight["iteration"] == split["iteration"] == 40
    for name, value in straight["model"].items():
        assert torch.equal(value, split["model"][name]), name
    for key, state in straight["optimizer"]["state"].items():
        for name, value in state.items():
            assert torch.equal(value, split["optimizer"]["state"][key][name])
    # metrics.jsonl of the resumed run reads as one run: each iteration once, in order.
    logged = [json.loads(line)["iteration"] for line in (tmp_path / "split/metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)) and logged[-1] == 40


def test_resume_refuses_a_different_experiment(tmp_path):
    train(debug_config(tmp_path, "train.iterations=5", "eval.at_end=false"))
    with pytest.raises(ConfigError, match=r"was trained with inner.steps = 1, the config says 3"):
        train(debug_config(tmp_path, "train.iterations=10", "inner.steps=3"))
    with pytest.raises(ConfigError, match=r"run.resume = false: .* already holds checkpoints"):
        train(debug_config(tmp_path, "train.iterations=10", "run.resume=false"))
    with pytest.raises(ConfigError, match=r"run.resume = true: no checkpoint in"):
        train(debug_config(tmp_path / "empty", "run.resume=true"))


def test_cosine_schedule_ends_at_lr_min():
    config = load_config(None, ["train.lr_schedule=cosine", "train.lr=0.01", "train.lr_min=0.001",
                                "train.iterations=100"])
    assert learning_rate(config, 0) == pytest.approx(0.01)
    assert learning_rate(config, 50) == pytest.approx(0.0055)
    assert learning_rate(config, 100) == pytest.approx(0.001)


def test_diverging_run_stops_with_a_clear_error_and_keeps_good_checkpoints(tmp_path):
    config = debug_config(tmp_path, "inner.lr=1000", "train.lr=1000", "train.log_every=5",
                          "train.checkpoint_every=1", "train.iterations=50")
    with pytest.raises(FloatingPointError, match=r"iteration \d+: (meta-loss is nan|weights are not finite)"):
        train(config)
    for path in list_checkpoints(tmp_path / "checkpoints"):
        assert all(torch.isfinite(v).all() for v in load_checkpoint(path)["model"].values())


def test_per_task_loop_engine_trains_identically(tmp_path):
    common = ["train.iterations=6", "eval.at_end=false", "engine.dtype=float64", "inner.steps=2"]
    train(debug_config(tmp_path / "vmap", *common))
    train(debug_config(tmp_path / "loop", "engine.batched=false", *common))
    a, b = final_state(tmp_path / "vmap")["model"], final_state(tmp_path / "loop")["model"]
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-12)


def test_cli_train_eval_plot(tmp_path):
    run = tmp_path / "run"
    out = run_cli(["train", "configs/sine_debug.yaml", f"run.dir={run}", "train.iterations=60", "eval.tasks=50"])
    assert "| steps | query loss (95% CI) |" in out.stdout
    result_json = tmp_path / "eval.json"
    out = run_cli(["eval", str(run), "--tasks", "40", "--shots", "5", "--steps", "3", "--json", str(result_json)])
    assert "40 fresh tasks, 5-shot" in out.stdout
    result = json.loads(result_json.read_text())
    assert [row["step"] for row in result["steps"]] == [0, 1, 2, 3]
    assert all(row["loss_ci95"] > 0 for row in result["steps"])
    run_cli(["plot", str(run / "checkpoints/ckpt_00000060.pt"), str(tmp_path / "fig.png")])
    assert (tmp_path / "fig.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_errors_are_one_line(tmp_path):
    out = run_cli(["train", "configs/sine_debug.yaml", "inner.steps=-1"], check=False)
    assert out.returncode == 2
    assert out.stderr.strip() == "distmaml train: error: command line: inner.steps = -1: must be >= 0"
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    out = run_cli(["eval", str(bad)], check=False)
    assert out.returncode == 2 and out.stderr.startswith(f"distmaml eval: error: {bad}: not a readable checkpoint")
    assert len(out.stderr.strip().splitlines()) == 1


def test_time_limit_stops_cleanly_checkpoints_and_evaluates(tmp_path):
    summary = train(debug_config(tmp_path, "train.iterations=1000000", "train.time_limit=2", "eval.tasks=20"))
    assert summary["status"] == "time_limit" and 0 < summary["iteration"] < 1000000
    assert summary["eval"]["steps"][-1]["loss"] > 0
    assert load_checkpoint(list_checkpoints(tmp_path / "checkpoints")[-1])["iteration"] == summary["iteration"]
