"""End-to-end behaviour of the trainer in one process: learning, resume, checkpoints, errors."""

import json
import math
import re

import pytest
import torch

from distmaml.build import build_inner
from distmaml.commands.train import learning_rate, train
from distmaml.config import ConfigError, load_config
from distmaml.run.checkpoint import list_checkpoints, load_checkpoint
from conftest import REPO, Planted, run_cli


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
    with pytest.raises(ConfigError, match=r"run.resume = true: no checkpoint in"):
        train(debug_config(tmp_path / "empty", "run.resume=true"))


def test_cosine_schedule_ends_at_lr_min():
    config = load_config(None, ["train.lr_schedule=cosine", "train.lr=0.01", "train.lr_min=0.001",
                                "train.iterations=100"])
    assert learning_rate(config, 0) == pytest.approx(0.01)
    assert learning_rate(config, 50) == pytest.approx(0.0055)
    assert learning_rate(config, 100) == pytest.approx(0.001)


def test_a_diverging_run_stops_at_once_names_the_last_good_checkpoint_and_writes_strict_json(tmp_path, capfd):
    common = ["train.log_every=50", "train.checkpoint_every=5", "eval.at_end=false"]
    train(debug_config(tmp_path, "train.iterations=10", *common))
    # The same run continued with a loss bound it cannot meet: it stops after its first iteration.
    summary = train(debug_config(tmp_path, "train.iterations=20", "train.max_meta_loss=1e-6", *common))
    assert summary["status"] == "diverged" and summary["diverged_at"] == summary["iteration"] == 11
    good = str(tmp_path / "checkpoints/ckpt_00000010.pt")
    assert summary["last_good_checkpoint"] == good
    assert re.fullmatch(r"training diverged at iteration 11: the meta-loss [0-9.]+ was above train.max_meta_loss = "
                        r"1e-06; stopped without writing a checkpoint; the last good checkpoint is "
                        f"{re.escape(good)} \\(iteration 10\\) \\(starting again resumes from it: .*\\)", summary["error"])
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == ["ckpt_00000005.pt", "ckpt_00000010.pt"]
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "diverged"
    # As the message says: starting again with a smaller train.lr and a clip resumes from iteration 10.
    capfd.readouterr()
    summary = train(debug_config(tmp_path, "train.iterations=20", "train.lr=0.0001", "train.grad_clip=1.0", *common))
    assert summary["status"] == "complete" and summary["iteration"] == 20
    logged = capfd.readouterr().err
    assert "trained with train.lr = 0.003; it continues with 0.0001" in logged
    assert "trained with train.grad_clip = 0.0; it continues with 1.0" in logged
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")][-1] == "ckpt_00000020.pt"


def test_a_run_gone_to_nan_exits_1_with_one_line_and_no_checkpoint(tmp_path):
    proc = run_cli(["train", "configs/sine_debug.yaml", f"run.dir={tmp_path}", "inner.lr=1000", "train.lr=1000",
                    "train.checkpoint_every=1", "train.iterations=50"], check=False)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith(
        "distmaml train: error: training diverged at iteration 1: the meta-gradient was not finite")
    assert "Traceback" not in proc.stderr and "| steps |" not in proc.stdout
    assert list_checkpoints(tmp_path / "checkpoints") == []

    def refuse(token):
        raise AssertionError(f"summary.json is not strict JSON: {token}")

    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary["status"] == "diverged" and summary["last_good_checkpoint"] is None and "eval" not in summary


def test_per_task_loop_engine_trains_identically(tmp_path):
    common = ["train.iterations=6", "eval.at_end=false", "engine.dtype=float64", "inner.steps=2"]
    train(debug_config(tmp_path / "vmap", *common))
    train(debug_config(tmp_path / "loop", "engine.batched=false", *common))
    a, b = final_state(tmp_path / "vmap")["model"], final_state(tmp_path / "loop")["model"]
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-12)


def test_auto_path_takes_the_faster_records_it_and_a_resume_takes_it_again(tmp_path, monkeypatch, capfd):
    """engine.batched = auto follows its probe (here made to favour the loop, then the batched path),
    is recorded in the checkpoints, and a resume goes on with the recorded path, bit for bit."""
    from distmaml.engine import preflight

    favoured = {"batched": False}
    probed = []

    def probe_seconds(learner, batch, inner, batched, device):
        probed.append((batched, inner.steps))
        return 1.0 if batched == favoured["batched"] else 2.0

    monkeypatch.setattr(preflight, "probe_seconds", probe_seconds)
    common = ["eval.at_end=false", "inner.steps=4", "train.checkpoint_every=2"]
    first = train(debug_config(tmp_path / "auto", "engine.batched=auto", "train.iterations=4", *common))
    assert first["batched"] is False and final_state(tmp_path / "auto")["batched"] is False
    assert sorted(probed) == [(False, 3), (True, 3)]
    assert "engine.batched = auto: the per-task loop (a probe of 3 inner step(s)" in capfd.readouterr().err
    favoured["batched"] = True
    resumed = train(debug_config(tmp_path / "auto", "engine.batched=auto", "train.iterations=6", *common))
    assert resumed["batched"] is False and len(probed) == 2
    assert "engine.batched = auto: the per-task loop, as the checkpoint recorded" in capfd.readouterr().err
    train(debug_config(tmp_path / "loop", "engine.batched=false", "train.iterations=6", *common))
    recorded, loop = final_state(tmp_path / "auto"), final_state(tmp_path / "loop")
    assert all(torch.equal(recorded["model"][name], loop["model"][name]) for name in loop["model"])
    assert recorded["batched"] is False and loop["batched"] is False


def test_auto_path_times_both_paths_for_real_and_runs_the_one_it_names(tmp_path, capfd):
    summary = train(debug_config(tmp_path, "engine.batched=auto", "train.iterations=2", "eval.at_end=false"))
    said = [line for line in capfd.readouterr().err.splitlines() if "engine.batched = auto:" in line]
    assert len(said) == 1, said
    batched, loop = map(float, re.search(r"took (\S+) s batched, (\S+) s task by task", said[0]).groups())
    assert batched > 0 and loop > 0
    assert summary["batched"] is (batched <= loop) and ("the batched path" in said[0]) is summary["batched"]


@pytest.mark.parametrize("value, expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_engine_batched_takes_true_false_or_auto(value, expected, tmp_path):
    assert debug_config(tmp_path, f"engine.batched={value}").engine.batched == expected
    with pytest.raises(ConfigError) as refused:
        debug_config(tmp_path, "engine.batched=sometimes")
    assert str(refused.value) == "command line: engine.batched = 'sometimes': must be true, false or auto"


def test_cli_train_eval_plot(tmp_path):
    run = tmp_path / "run"
    out = run_cli(["train", "configs/sine_debug.yaml", f"run.dir={run}", "train.iterations=60", "eval.tasks=50"])
    assert "| steps | query loss (mean ± 95% CI) | query loss (median [IQR]) |" in out.stdout
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


def test_a_diverging_evaluation_is_counted_flagged_and_written_as_strict_json(tmp_path, monkeypatch, capfd):
    from test_evaluate import plant_blow_up

    plant_blow_up(monkeypatch, task_index=3, scale=1e8)
    summary = train(debug_config(tmp_path, "train.iterations=200", "eval.tasks=50", "eval.steps=10"))
    last = summary["eval"]["steps"][-1]
    assert last["diverged"] == 1 and last["loss_median"] < 10
    assert summary["status"] == "complete" and summary["warnings"][0].startswith("eval: 1 of 50 tasks diverged")

    def refuse(token):
        raise AssertionError(f"summary.json is not strict JSON: {token}")

    written = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert written["eval"]["steps"][-1]["diverged"] == 1
    logged = capfd.readouterr().err.splitlines()
    final = [line.split("INFO distmaml.train: ")[1] for line in logged if "INFO distmaml.train: eval on" in line]
    assert len(final) == 1 and final[0].startswith("eval on 50 fresh tasks: query loss ")
    assert "median" in final[0] and "1 of 50 tasks diverged" in final[0]
    assert "e+" not in final[0] and "nan" not in final[0] and "inf" not in final[0]
    assert any("WARNING distmaml.train: eval: 1 of 50 tasks diverged within 10 step(s), the first at step 1"
               in line for line in logged)


def test_engine_threads_sets_the_process_thread_count(tmp_path):
    train(debug_config(tmp_path, "train.iterations=2", "eval.at_end=false", "engine.threads=2"))
    assert torch.get_num_threads() == 2  # (the test fixture restores the count afterwards)
    proc = run_cli(["train", "configs/sine_debug.yaml", f"run.dir={tmp_path / 'cli'}", "train.iterations=2",
                    "eval.at_end=false", "engine.threads=3"], env={"OMP_NUM_THREADS": "1"})
    assert "3 CPU thread(s)" in proc.stderr


def test_truncated_normal_init_is_the_maml_reference_codes():
    from distmaml.models import build_model

    torch.manual_seed(0)
    model = build_model(load_config(None, ["model.init=truncated_normal", "model.init_std=0.01",
                                           "model.hidden=[400, 400]"]), (1,), 1)
    weights = [p for name, p in model.named_parameters() if name.endswith("weight")]
    biases = [p for name, p in model.named_parameters() if name.endswith("bias")]
    assert all(torch.equal(b, torch.zeros_like(b)) for b in biases)
    middle = weights[1].detach()
    assert middle.abs().max() <= 0.02 and 0.007 < middle.std() < 0.0095  # cut at 2 std: std 0.88 * 0.01
    torch.manual_seed(0)
    default = build_model(load_config(None, ["model.hidden=[400, 400]"]), (1,), 1)
    assert default.net[2].weight.abs().max() > 0.04  # PyTorch's Kaiming-uniform, bound 1/sqrt(400)


# ------------------------------------------------------------------------------ inner rules


def test_sine_debug_s_sgd_path_is_the_per_task_reference_s(tmp_path):
    """The trainer's default path (plain SGD inner steps, the batched engine, the mean over tasks, Adam) in
    float64 for a few meta-iterations: the per-task reference (distmaml.meta.meta_gradient_loop) with
    torch's Adam gives the same meta-losses and weights to 1e-10. (Its task stream is pinned in
    test_sine.py; float32 meta-losses are not pinned: their rounding differs between CPUs.)"""
    from distmaml.build import build
    from distmaml.meta import meta_gradient_loop
    from distmaml.rng import STREAM_TRAIN

    config = debug_config(tmp_path, "engine.dtype=float64", "train.iterations=4", "train.log_every=1",
                          "eval.at_end=false")
    train(config)
    logged = [json.loads(line)["meta_loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    torch.manual_seed(config.train.seed)
    learner = build(config)
    theta, tasks = learner.theta, torch.arange(config.train.meta_batch)
    optimizer = torch.optim.Adam(theta.values(), lr=config.train.lr, betas=tuple(config.train.betas))
    expected = []
    for iteration in range(4):
        reference = meta_gradient_loop(learner.problem, theta, learner.family.sample(STREAM_TRAIN, iteration, tasks),
                                       learner.inner)
        expected.append(float(reference.task_losses.mean()))
        for param, grad in zip(theta.values(), reference.grad_sum.values()):
            param.grad = grad / config.train.meta_batch
        optimizer.step()
    assert logged == pytest.approx(expected, rel=1e-10, abs=0)
    weights = final_state(tmp_path)["model"]
    assert weights.keys() == theta.keys() and all(value.dtype == torch.float64 for value in weights.values())
    for name, value in weights.items():
        assert (value - theta[name].detach()).norm() <= 1e-10 * theta[name].detach().norm(), name


@pytest.mark.parametrize("overrides, expected", [
    (["inner.rule=rmsprop"], "command line: inner.rule = 'rmsprop': must be one of sgd, meta_sgd, lslr, schedule, "
                             "momentum, adam"),
    (["inner.rule=momentum"], "command line, with inner.momentum at its default: inner.momentum = None: the momentum "
                              "rule needs a coefficient in [0, 1), e.g. 0.9"),
    (["inner.rule=momentum", "inner.momentum=1.0"], "command line: inner.momentum = 1.0: must be in [0, 1)"),
    (["inner.lr=-0.01"], "command line: inner.lr = -0.01: must be > 0"),
    (["inner.rule=adam", "inner.betas=[0.9, 1.5]"], "command line: inner.betas = [0.9, 1.5]: must be two numbers in "
                                                    "[0, 1)"),
])
def test_bad_inner_settings_are_one_line(overrides, expected):
    """By the config (a rule's name, the inner rate) or by the rule that owns the setting, as it is built."""
    with pytest.raises(ConfigError) as refused:
        build_inner(load_config(REPO / "configs/sine_debug.yaml", overrides))
    assert str(refused.value) == expected


@pytest.mark.parametrize("overrides, expected", [
    # The implicit methods differentiate the inner problem's solution, whichever fixed rule reaches it; the
    # safeguard (on by default) caps plain SGD steps only, so it is what refuses Adam (blamed on inner.mode's
    # source, and said to be the default, since inner_safeguard was left at it).
    (["inner.rule=adam", "inner.mode=implicit", "maml.proximal=1.0"],
     "command line, with implicit.inner_safeguard at its default: implicit.inner_safeguard = True: caps plain SGD "
     "steps; with inner.rule = adam set implicit.inner_safeguard=false"),
    (["inner.rule=meta_sgd", "inner.mode=implicit", "maml.proximal=1.0"],
     "command line: inner.rule = 'meta_sgd': implicit differentiates the solution of the inner problem, which does "
     "not depend on learned step sizes: they would get no gradient"),
    (["inner.rule=meta_sgd", "inner.mode=reptile"], "command line: inner.rule = 'meta_sgd': Reptile's meta-gradient "
                                                    "phi - w_K gives learned step sizes no gradient"),
])
def test_rules_a_method_cannot_differentiate_are_one_line_when_the_run_is_built(tmp_path, overrides, expected):
    """inner.mode may be an import path, so these checks belong to the method and run at build time."""
    config = load_config(REPO / "configs/sine_debug.yaml", overrides)
    with pytest.raises(ConfigError) as refused:
        build_inner(config)
    assert str(refused.value) == expected
    # The command line refuses it in the same line, before any iteration.
    proc = run_cli(["train", "configs/sine_debug.yaml", f"run.dir={tmp_path}", *overrides], check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"distmaml train: error: {expected}", proc.stderr
    assert not (tmp_path / "checkpoints").exists()


def test_an_adapt_prefix_that_matches_no_weight_is_one_line(tmp_path):
    proc = run_cli(["train", "configs/sine_debug.yaml", f"run.dir={tmp_path}", "inner.adapt=[head]"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("distmaml train: error: command line: inner.adapt = ['head']: no weight of the "
                                   "model starts with 'head' (its weights: net.0.weight, net.0.bias, net.2.weight, "
                                   "net.2.bias, net.4.weight, net.4.bias)")


@pytest.mark.parametrize("rule", ["meta_sgd", "lslr"])
def test_learned_step_sizes_are_trained_checkpointed_and_resume_bit_exactly(tmp_path, rule):
    common = [f"inner.rule={rule}", "inner.steps=2", "train.checkpoint_every=0", "eval.at_end=false",
              "train.log_every=7"]
    train(debug_config(tmp_path / "straight", "train.iterations=30", *common))
    train(debug_config(tmp_path / "split", "train.iterations=13", *common))
    train(debug_config(tmp_path / "split", "train.iterations=30", *common))
    straight, split = final_state(tmp_path / "straight"), final_state(tmp_path / "split")
    assert straight["rule"].keys() == {f"inner.lr.{name}" for name in straight["model"]}
    for name, value in straight["rule"].items():
        assert torch.equal(value, split["rule"][name]), name
        assert not torch.all(value == 0.01), name  # the outer Adam moved them from inner.lr
    for name, value in straight["model"].items():
        assert torch.equal(value, split["model"][name]), name


def test_anil_and_reptile_train_and_evaluate(tmp_path):
    anil = train(debug_config(tmp_path / "anil", "inner.adapt=[net.4]", "inner.steps=3", "eval.tasks=40"))
    reptile = train(debug_config(tmp_path / "reptile", "inner.mode=reptile", "inner.steps=5", "inner.lr=0.02",
                                 "train.lr=0.003", "eval.tasks=40"))
    for summary in (anil, reptile):
        steps = summary["eval"]["steps"]
        assert summary["status"] == "complete" and steps[-1]["loss"] < steps[0]["loss"]


class HarderFromIteration30(Planted):
    """Targets 30 times larger from iteration 30 on: the meta-loss jumps far above its first window's (900 x)."""

    def change(self, batch, iteration):
        scale = 30.0 if int(iteration) >= 30 else 1.0
        return batch._replace(support_y=batch.support_y * scale, query_y=batch.query_y * scale)


def test_a_meta_loss_far_above_its_first_window_ends_the_run_as_diverged(tmp_path, capsys):
    from distmaml.commands.cli import main

    code = main(["train", str(REPO / "examples/polynomials.yaml"), f"task.family={__name__}:HarderFromIteration30",
                 f"run.dir={tmp_path}", "train.iterations=60", "train.log_every=10", "train.checkpoint_every=10",
                 "logging.progress=false", "logging.sharpness=false"])
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1
    assert re.fullmatch(r"distmaml train: error: training diverged at iteration 31: the meta-loss [0-9.e+]+ was above "
                        r"train.max_meta_loss_factor = 100 times its median over the first logged window, [0-9.]+ "
                        r"\(iterations 1..10\); stopped without writing a checkpoint; the last good checkpoint is "
                        f"{re.escape(str(tmp_path / 'checkpoints/ckpt_00000030.pt'))} \\(iteration 30\\) .*", line), line
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["diverged_at"] == 31 and "eval" not in summary
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")][-1] == "ckpt_00000030.pt"
    # The bound survives a resume: it lives in the checkpoint, not in this process.
    assert load_checkpoint(tmp_path / "checkpoints/ckpt_00000030.pt")["meta_loss_reference"]["last"] == 10
    assert train(load_config(REPO / "examples/polynomials.yaml", [
        f"task.family={__name__}:HarderFromIteration30", f"run.dir={tmp_path}", "train.iterations=60",
        "logging.progress=false", "logging.sharpness=false"]))["diverged_at"] == 31


def test_a_checkpoint_inside_the_first_logged_window_keeps_its_meta_losses_for_the_bound(tmp_path):
    # A run stopped at once by its time limit checkpoints at iteration 1, before the first log at 10:
    # resumed, it must take the median of the same iterations 1..10 as a run that never stopped.
    common = ["train.iterations=12", "train.log_every=10", "eval.at_end=false", "logging.progress=false",
              "logging.sharpness=false"]
    whole = tmp_path / "whole"
    train(load_config(REPO / "examples/polynomials.yaml", [*common, f"run.dir={whole}"]))
    parts = tmp_path / "parts"
    assert train(load_config(REPO / "examples/polynomials.yaml", [*common, f"run.dir={parts}",
                                                                  "train.time_limit=1e-9"]))["iteration"] == 1
    assert load_checkpoint(parts / "checkpoints/ckpt_00000001.pt")["first_window_losses"].shape == (1,)
    train(load_config(REPO / "examples/polynomials.yaml", [*common, f"run.dir={parts}"]))
    expected = load_checkpoint(whole / "checkpoints/ckpt_00000012.pt")["meta_loss_reference"]
    assert expected["first"] == 1 and expected["last"] == 10
    assert load_checkpoint(parts / "checkpoints/ckpt_00000012.pt")["meta_loss_reference"] == expected
    assert "first_window_losses" not in load_checkpoint(parts / "checkpoints/ckpt_00000012.pt")


def test_an_evaluation_in_which_most_tasks_diverge_ends_the_run_as_diverged(tmp_path, capsys):
    """inner.lr = 20: training "completed" and exit 0 although every evaluation task blew up from step 1."""
    from distmaml.commands.cli import main

    code = main(["train", str(REPO / "configs/sine_debug.yaml"), f"run.dir={tmp_path}", "inner.lr=20",
                 "train.iterations=10", "eval.tasks=20", "logging.progress=false", "logging.sharpness=false"])
    out, err = capsys.readouterr()
    assert code == 1 and "| steps |" in out  # the table is still shown
    assert re.fullmatch(r"distmaml train: error: the evaluation diverged: \d+ of 20 fresh tasks diverged by inner step "
                        r"\d+ \(query loss non-finite or above eval.diverged_factor = 10 times its value before "
                        r"adaptation\), more than 50% of them: the model trained to iteration 10 "
                        f"\\({re.escape(str(tmp_path / 'checkpoints/ckpt_00000010.pt'))}\\) does not adapt stably; "
                        r"distmaml eval with fewer --steps shows how far it holds", err.strip().splitlines()[-1])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["eval"]["steps"][-1]["diverged"] > 10
    assert (tmp_path / "checkpoints/ckpt_00000010.pt").exists()


def test_train_iterations_below_the_iteration_reached_is_refused(tmp_path):
    train(debug_config(tmp_path, "train.iterations=10", "eval.at_end=false"))
    with pytest.raises(ConfigError) as refused:
        train(debug_config(tmp_path, "train.iterations=5"))
    assert str(refused.value) == (f"command line: train.iterations = 5: below iteration 10, where "
                                  f"{tmp_path / 'checkpoints/ckpt_00000010.pt'} already is; give train.iterations >= 10 "
                                  "to go on, or another run.dir")
