"""Persistent evolution strategies end to end: antithetic pairs of runs resumed bit for bit mid-horizon
(their accumulated perturbations in the checkpoint), sharded over two processes pair by pair with the
same estimate as one, a pair with a member that is not finite dropped whole and counted, and PES's bad
settings refused in one line before any work."""

import json

import pytest
import torch

from distmaml.commands.train import train
from distmaml.config import ConfigError, load_config
from distmaml.errors import DistmamlError
from conftest import REPO
import test_dist
from test_dist import run
from test_online_train import ONLINE, assert_same_runs, last

_no_leftover_processes = test_dist._no_leftover_processes

# The online logistic set-up (3 -> 4 runs: 2 antithetic pairs), its decays learned by PES.
PES = [*[s for s in ONLINE if not s.startswith(("online.runs", "train.meta_batch", "inner.mode"))],
       "online.runs=4", "train.meta_batch=4", "inner.mode=pes", "es.sigma=0.2"]


def pes_config(run_dir, *overrides):
    return load_config(REPO / "configs/logistic_weight_decay.yaml", [f"run.dir={run_dir}", *PES, *overrides])


def test_pes_runs_resume_bit_for_bit_mid_horizon(tmp_path):
    straight = train(pes_config(tmp_path / "straight", "train.iterations=8"))
    assert straight["status"] == "complete"
    train(pes_config(tmp_path / "split", "train.iterations=5"))  # stopped mid-horizon (6 steps, 2 per outer step)
    train(pes_config(tmp_path / "split", "train.iterations=8"))
    a, b = last(tmp_path / "straight"), last(tmp_path / "split")
    assert_same_runs(a, b)
    runs = a["online"]
    # Pairs share their counter and life; their members hold opposite accumulated perturbations.
    assert torch.equal(runs["step"][0::2], runs["step"][1::2]) and torch.equal(runs["lives"][0::2], runs["lives"][1::2])
    for name, value in runs["carry"]["perturbation"].items():
        assert torch.equal(value[0::2], -value[1::2]), name
        assert value.abs().sum() > 0, name
    logged = [json.loads(line) for line in (tmp_path / "straight/metrics.jsonl").read_text().splitlines()]
    assert all(line["es_sq_norm"] > 0 and line["es_loss_gap"] >= 0 for line in logged)


def test_two_processes_hold_whole_pairs_and_match_one(tmp_path):
    """3 pairs over 2 processes: 2 pairs and 1 (4 runs and 2, where a split by runs would give 3 and 3)."""
    six = ["online.runs=6", "train.meta_batch=6", "train.iterations=5"]
    run(["bash", str(REPO / "launch/torchrun.sh"), "configs/logistic_weight_decay.yaml", *PES, *six,
         f"run.dir={tmp_path / 'two'}"], NPROC="2")
    train(pes_config(tmp_path / "one", *six))
    assert_same_runs(last(tmp_path / "one"), last(tmp_path / "two"), exact=False)


def test_a_pair_with_one_member_not_finite_is_left_out_whole_and_both_start_again(tmp_path):
    from distmaml.build import build
    from distmaml.engine.schedule import Online
    from distmaml.meta import meta_gradient

    config = pes_config(tmp_path)
    learner = build(config)
    phi = learner.theta
    online = Online(learner, config, torch.arange(4))
    online.start()
    weights = next(iter(online.runs.weights))
    online.runs.weights[weights][1].fill_(float("nan"))
    _, tasks, result = online.lookahead(3, learner.inner, lambda p, t, i, noise: meta_gradient(p, phi, t, i, noise=noise))
    assert online.bad.tolist() == [True, True, False, False]
    assert bool(torch.isfinite(result.task_losses).all()) and len(result.task_losses) == 2
    online.advance(phi)
    assert online.failures.tolist() == [1, 1, 0, 0] and online.lives.tolist() == [1, 1, 0, 0]
    assert online.runs.step[:2].tolist() == [0, 0] and bool(torch.isfinite(online.runs.weights[weights]).all())
    for value in online.runs.carry["perturbation"].values():
        assert not bool(value[:2].any()) and bool(value[2:].any())


def test_runs_that_keep_failing_stop_the_pes_training_as_diverged(tmp_path):
    summary = train(pes_config(tmp_path, "inner.lr=1e30", "train.iterations=8"))
    assert summary["status"] == "diverged"
    assert "had a state that was not finite and started again, above online.max_resets = 0.5" in summary["error"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert logged and logged[-1]["runs_not_finite"] > 0 and logged[-1]["runs_not_finite"] % 2 == 0


@pytest.mark.parametrize("overrides, message", [
    (["online.runs=3", "train.meta_batch=3"], "online.runs = 3: pes takes the runs in groups of 2"),
    (["es.sigma=0"], "es.sigma = 0.0: must be > 0"),
    (["es.sigma_of=[decay]"], "es.sigma_of = 'decay': each entry is 'name-prefix=sigma'"),
    (["online.horizon=1"], "online.horizon = 1: must be at least online.unroll"),
])
def test_bad_pes_settings_are_refused_in_one_line(tmp_path, overrides, message):
    with pytest.raises((ConfigError, DistmamlError), match=message.replace("(", r"\(")):
        train(pes_config(tmp_path, *overrides))
    assert not (tmp_path / "checkpoints").exists()


def test_pes_on_an_episodic_schedule_is_refused(tmp_path):
    episodic = [s for s in PES if not s.startswith(("online.", "train.meta_batch", "inner.steps"))]
    with pytest.raises(DistmamlError, match="inner.mode = 'pes': persistent ES keeps each particle's state"):
        train(load_config(REPO / "configs/logistic_weight_decay.yaml", [f"run.dir={tmp_path}", *episodic]))
    assert not (tmp_path / "checkpoints").exists()


def test_gradcheck_reports_the_evolution_strategies_as_z_scores(tmp_path, capsys):
    """Against the exact gradients of their smoothed objective under the same perturbations, from the runs'
    stored state; PES with an odd number of runs, or episodic, is skipped with its reason."""
    from distmaml.commands import cli

    settings = [s for s in PES if not s.startswith(("eval.", "logging.", "train.log", "train.checkpoint"))]
    code = cli.main(["gradcheck", str(REPO / "configs/logistic_weight_decay.yaml"), *settings,
                     "implicit.inner_safeguard=false", "--tasks", "4", "--json", str(tmp_path / "check.json")])
    out = capsys.readouterr().out
    assert code == 0, out
    checked = json.loads((tmp_path / "check.json").read_text())["methods"]
    for name in ("es", "pes"):
        assert checked[name]["reference"] == "smoothed" and checked[name]["particles"] > 0, checked[name]
        assert abs(checked[name]["z"]) <= 4, checked[name]
    assert "rel_error" in checked["pes"] and "z" not in checked["second_order"]
    code = cli.main(["gradcheck", str(REPO / "configs/logistic_weight_decay.yaml"), *settings,
                     "implicit.inner_safeguard=false", "--tasks", "3", "--json", str(tmp_path / "odd.json")])
    capsys.readouterr()
    assert "groups of 2" in json.loads((tmp_path / "odd.json").read_text())["skipped"]["pes"]


def test_runs_another_method_trained_are_paired_on_resuming(tmp_path):
    """A checkpoint's runs without carries (another method trained them) go on under PES with zero
    accumulated perturbations, and a pair whose members differ (counter or starts) starts again whole."""
    from distmaml.build import build
    from distmaml.engine import dist
    from distmaml.engine.schedule import Online

    config = pes_config(tmp_path)
    learner = build(config)
    online = Online(learner, config, torch.arange(4))
    state = online.state_dict(dist.Context())
    del state["carry"]
    state["lives"][1] = 3  # run 1 started again more often than its partner
    online.load_state_dict(state)
    assert online.lives.tolist()[:2] == [4, 4] and online.runs.step.tolist()[:2] == [0, 0]
    assert online.runs.step.tolist()[2:] == state["step"].tolist()[2:]
    for value in online.runs.carry["perturbation"].values():
        assert not bool(value.any())
