"""Online training end to end: persistent runs checkpointed and resumed bit for bit (also after kill -9),
sharded over two processes like tasks, counted resets, and every bad online setting refused in one line."""

import json
import signal
import time

import pytest
import torch

from distmaml.commands.train import train
from distmaml.config import ConfigError, load_config
from distmaml.errors import DistmamlError
from distmaml.run.checkpoint import list_checkpoints, load_checkpoint
from conftest import REPO
import test_dist
from test_dist import run, start

_no_leftover_processes = test_dist._no_leftover_processes  # the autouse fixture that kills what a test left running

# Per-feature decays of the logistic regression, learned online by 3 runs of momentum SGD on mini-batches
# of 20 (their counters pick the batches), 2 steps per outer step, starting again every 6 steps.
# (The config's own inner.steps and train.meta_batch, given again at the values online gives them.)
ONLINE = ["online.runs=3", "online.unroll=2", "online.horizon=6", "inner.steps=2", "train.meta_batch=3", "inner.mode=second_order", "inner.rule=momentum",
          "inner.momentum=0.9", "inner.lr=0.5", "inner.checkpoint=none", "training_run.batch_size=20",
          "eval.at_end=false", "logging.progress=false", "train.log_every=4", "train.checkpoint_every=5"]


def online_config(run_dir, *overrides):
    return load_config(REPO / "configs/logistic_weight_decay.yaml", [f"run.dir={run_dir}", *ONLINE, *overrides])


def last(run_dir):
    return load_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1])


def assert_same_runs(a, b, exact=True):
    assert a["iteration"] == b["iteration"]
    for part in ("problem", "rule"):
        for name, value in a[part].items():
            if exact:
                assert torch.equal(value, b[part][name]), name
            else:
                torch.testing.assert_close(value, b[part][name], rtol=1e-5, atol=1e-7)
    runs_a, runs_b = a["online"], b["online"]
    for key in ("step", "lives", "failures"):
        assert torch.equal(runs_a[key], runs_b[key]), key
    assert ("carry" in runs_a) == ("carry" in runs_b)
    for tree in ("weights", "state", "carry"):
        if tree not in runs_a:
            continue
        flat_a, flat_b = _leaves(runs_a[tree]), _leaves(runs_b[tree])
        assert len(flat_a) == len(flat_b), tree
        for x, y in zip(flat_a, flat_b):
            if exact:
                assert torch.equal(x, y), tree
            else:
                torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-7)


def _leaves(tree):
    return torch.utils._pytree.tree_flatten(tree)[0]


def test_online_runs_resume_bit_for_bit(tmp_path):
    straight = train(online_config(tmp_path / "straight", "train.iterations=12"))
    assert straight["status"] == "complete"
    train(online_config(tmp_path / "split", "train.iterations=7"))
    train(online_config(tmp_path / "split", "train.iterations=12"))
    assert_same_runs(last(tmp_path / "straight"), last(tmp_path / "split"))
    # 12 outer steps of 2 over a horizon of 6, from counters 0, 2, 4: the first run has just finished its
    # fourth life (it starts again at the next lookahead), the others are in their fifth.
    state = last(tmp_path / "straight")["online"]
    assert state["step"].tolist() == [6, 2, 4] and state["lives"].tolist() == [3, 4, 4]
    assert straight["online"]["restarts"] == 11 and straight["online"]["restarts_not_finite"] == 0
    assert 0 < straight["online"]["metrics"]["test_accuracy"] <= 1


def test_a_killed_online_run_resumes_to_the_uninterrupted_result(tmp_path):
    common = [f"run.dir={tmp_path / 'killed'}", "train.iterations=60", "train.checkpoint_every=10",
              "train.keep_checkpoints=10"]
    proc = start(["python", "-m", "distmaml", "train", "configs/logistic_weight_decay.yaml", *ONLINE, *common])
    deadline = time.monotonic() + 120
    while not list_checkpoints(tmp_path / "killed/checkpoints") and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    done = len(list_checkpoints(tmp_path / "killed/checkpoints"))
    assert 1 <= done < 6, "the kill came after the run had finished"
    run(["python", "-m", "distmaml", "train", "configs/logistic_weight_decay.yaml", *ONLINE, *common])
    train(online_config(tmp_path / "straight", "train.iterations=60"))
    assert_same_runs(last(tmp_path / "straight"), last(tmp_path / "killed"))


def test_two_processes_share_the_runs_and_match_one(tmp_path):
    """3 runs over 2 processes (2 + 1): the same phi and run states as one process, to float rounding."""
    overrides = [*ONLINE, "train.iterations=6"]
    run(["bash", str(REPO / "launch/torchrun.sh"), "configs/logistic_weight_decay.yaml", *overrides,
         f"run.dir={tmp_path / 'two'}"], NPROC="2")
    train(online_config(tmp_path / "one", "train.iterations=6"))
    assert_same_runs(last(tmp_path / "one"), last(tmp_path / "two"), exact=False)


def test_runs_that_keep_failing_stop_the_training_as_diverged(tmp_path):
    summary = train(online_config(tmp_path, "inner.lr=1e30", "train.iterations=8"))
    assert summary["status"] == "diverged"
    assert "had a state that was not finite and started again, above online.max_resets = 0.5" in summary["error"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged and logged[-1]["runs_not_finite"] > 0


@pytest.mark.parametrize("overrides, message", [
    (["online.unroll=0"], "online.unroll = 0: must be >= 1"),
    (["online.runs=-1"], "online.runs = -1: must be >= 0"),
    (["online.horizon=1"], "online.horizon = 1: must be at least online.unroll (2)"),
    (["online.horizon=5"], "online.horizon = 5: must be a multiple of online.unroll (2)"),
    (["inner.steps=3"], "inner.steps = 3: online, it is the unroll, online.unroll (2): leave it out"),
    (["train.meta_batch=4"], "train.meta_batch = 4: online, it is the runs, online.runs (3): leave it out"),
    (["engine.batched=auto"], "engine.batched = 'auto': online runs take the batched path"),
    (["online.max_resets=0"], "online.max_resets = 0.0: must be a fraction in (0, 1]"),
])
def test_bad_online_settings_are_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        online_config(tmp_path, *overrides)


def test_online_keys_without_online_runs_are_refused():
    with pytest.raises(ConfigError, match=r"online.unroll = 4: applies to online runs \(online.runs >= 1\)"):
        load_config(REPO / "configs/logistic_weight_decay.yaml", ["online.unroll=4"])


@pytest.mark.parametrize("config, overrides, message", [
    ("configs/sine_debug.yaml", ["online.runs=2", "train.meta_batch=2"], "MAML does not run online"),
    ("configs/logistic_weight_decay.yaml", [*ONLINE, "problem.name=learning_rate", "inner.rule=lslr"],
     "inner.rule = 'lslr'"),
    ("configs/logistic_weight_decay.yaml", [*ONLINE, "problem.name=learning_rate", "inner.rule=schedule",
                                            "inner.schedule_blocks=2", "online.horizon=0"], "online.horizon = 0"),
    ("configs/logistic_weight_decay.yaml", [*ONLINE, "problem.name=learning_rate", "inner.rule=schedule",
                                            "inner.mode=implicit", "implicit.inner_safeguard=false"],
     "would get no gradient"),
])
def test_impossible_online_combinations_are_refused_before_work(tmp_path, config, overrides, message):
    with pytest.raises(DistmamlError, match=message):
        train(load_config(REPO / config, [f"run.dir={tmp_path}", "logging.progress=false", *overrides]))
    assert not (tmp_path / "checkpoints").exists()


def test_learning_to_reweight_is_refused_episodic(tmp_path):
    pytest.importorskip("mnist1d")
    with pytest.raises(DistmamlError, match="LearningToReweight runs online only"):
        train(load_config(REPO / "configs/mnist1d_l2rw_online.yaml", [f"run.dir={tmp_path}", "online.runs=0"]))


def test_resuming_with_other_runs_or_unroll_is_refused(tmp_path):
    train(online_config(tmp_path, "train.iterations=2"))
    for changes, key in ((["online.runs=4", "train.meta_batch=4"], "online.runs"),
                         (["online.unroll=3", "inner.steps=3"], "online.unroll")):
        with pytest.raises(ConfigError, match=f"was trained with {key}"):
            train(online_config(tmp_path, "train.iterations=4", *changes))
    episodic = [setting for setting in ONLINE if not setting.startswith("online.")]
    with pytest.raises(ConfigError, match="was trained with online.runs = 3"):
        train(load_config(REPO / "configs/logistic_weight_decay.yaml",
                          [f"run.dir={tmp_path}", "train.iterations=4", *episodic]))


def test_gradcheck_checks_the_methods_on_the_runs_stored_state(tmp_path, capsys):
    """`distmaml gradcheck` on an online config: the U-step objective from the runs' staggered, burned-in
    state, against finite differences; the exact methods agree."""
    from distmaml.commands import cli

    settings = [setting for setting in ONLINE if not setting.startswith(("eval.", "logging.", "train.log"))]
    code = cli.main(["gradcheck", str(REPO / "configs/logistic_weight_decay.yaml"), *settings, "--tasks", "3",
                     "--json", str(tmp_path / "check.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "3 online run(s) at their staggered counters, 2 inner step(s) of momentum" in out
    checked = json.loads((tmp_path / "check.json").read_text())["methods"]
    exact = checked["second_order"]
    assert exact["exact"] and exact["rel_error"] <= exact["tolerance"], checked
    assert not checked["truncated"]["exact"]  # the last of the two steps: an approximation, reported as one


@pytest.mark.parametrize("overrides, message", [
    (["online.burn_in=false", "inner.rule=adam"], "online.burn_in = False: a run that starts fresh"),
    (["inner.mode=implicit", "inner.rule=sgd"], "implicit.inner_safeguard = True: caps the lookahead's steps only"),
])
def test_online_settings_that_would_compute_something_else_are_refused(tmp_path, overrides, message):
    """Each asked of the rule (it counts its own updates) or the method (it caps the steps it takes)."""
    with pytest.raises(ConfigError, match=message):
        train(online_config(tmp_path, *overrides))
    assert not (tmp_path / "checkpoints").exists()


def test_more_processes_than_runs_and_a_problem_with_nothing_to_learn(tmp_path):
    """Learning to Reweight (no phi) over 2 processes with 1 run: the second process holds no run and only
    joins the collectives; a 2-step unroll is estimated as the runs' own steps."""
    pytest.importorskip("mnist1d")
    out = run(["bash", str(REPO / "launch/torchrun.sh"), "configs/mnist1d_l2rw_online.yaml", f"run.dir={tmp_path}",
               "train.iterations=4", "online.unroll=2", "eval.at_end=false", "logging.progress=false",
               "train.log_every=2", "train.checkpoint_every=2"], NPROC="2")
    assert "tasks 1..0 of 1" in out or "2 process(es)" in out, out
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["online"]["steps"] == [8], summary


def test_the_next_batch_outer_loss_is_refused_episodic(tmp_path):
    with pytest.raises(ConfigError, match="training_run.outer = 'next_batch': the next mini-batch is a persistent"):
        load_config(REPO / "configs/logistic_weight_decay.yaml", ["training_run.outer=next_batch"])
