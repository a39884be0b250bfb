"""The memory estimate made before training starts, and the refusal of runs that would not fit."""

import dataclasses

import pytest
import torch

from distmaml.build import build, build_inner
from distmaml.config import load_config
from distmaml.engine import memory
from distmaml.engine.step import compute_meta_gradient
from distmaml.errors import ConfigError
from distmaml.rng import STREAM_TRAIN
from conftest import ESTIMATE_BOUND, REPO, run_cli


def sine(*overrides):
    """(config, its MAML problem, phi, a training batch) of a small sine set-up."""
    config = load_config(REPO / "configs/sine_debug.yaml", ["model.hidden=[64, 64]", "task.support=30",
                                                            "task.query=30", "train.meta_batch=6", *overrides])
    torch.manual_seed(0)
    learner = build(config)
    batch = learner.family.sample(STREAM_TRAIN, 0, torch.arange(config.train.meta_batch))
    return config, learner.problem, learner.theta, batch


def engine(problem, theta, batch, inner, step_weights=None):
    """The engine's meta-gradient, as the trainer hands it to the estimate."""
    return compute_meta_gradient(problem, theta, batch, inner, step_weights=step_weights)


def exact_peak(config, problem, params, batch, device="meta"):
    """The whole unroll under the byte counter: what the estimate extrapolates to."""
    config = dataclasses.replace(config, engine=dataclasses.replace(config.engine, cuda_graph=device == "meta"))
    on = problem.to(device)
    weights = {name: value.detach().to(device).requires_grad_() for name, value in params.items()}
    data = type(batch)(*(t.to(device) if device != "meta" else torch.empty(t.shape, dtype=t.dtype, device="meta")
                         for t in batch))
    with memory.LiveBytes() as counter:
        engine(on, weights, data, build_inner(config))
    return counter.peak


def test_counted_bytes_on_meta_tensors_are_those_of_the_real_run():
    config, maml, params, batch = sine("inner.steps=3")
    assert exact_peak(config, maml, params, batch) == exact_peak(config, maml, params, batch, "cpu")


@pytest.mark.parametrize("overrides", [
    ["inner.steps=12"], ["inner.steps=12", "inner.checkpoint=auto"], ["inner.steps=12", "inner.checkpoint=every_step"],
    ["inner.steps=13", "inner.checkpoint=segments", "inner.checkpoint_segment=4"],
    ["inner.steps=12", "inner.mode=truncated", "inner.truncate=5"],
    ["inner.steps=12", "inner.mode=truncated", "inner.truncate=6", "inner.checkpoint=auto"],
    ["inner.steps=12", "inner.mode=first_order"], ["inner.steps=6", "inner.mode=implicit", "maml.proximal=1.0"],
    ["inner.steps=2"],
])
def test_the_estimate_is_within_ten_percent_of_the_whole_unroll(overrides):
    config, maml, params, batch = sine(*overrides)
    found = memory.estimate(maml, params, batch, build_inner(config), engine)
    exact = exact_peak(config, maml, params, batch) + found.fixed_bytes + sum(
        t.numel() * t.element_size() for t in batch)
    assert abs(found.peak_bytes / exact - 1) < ESTIMATE_BOUND, (found, exact)


@pytest.mark.parametrize("overrides, expected", [
    (["inner.steps=100000000"], r"would fit: inner.checkpoint=auto \(.*\), inner.mode=first_order \("),
    (["task.query=100000000"], r"1 task\(s\)|25 task\(s\) on this process\), more than the"),
])
def test_a_run_that_cannot_fit_is_refused_before_it_starts(tmp_path, overrides, expected):
    proc = run_cli(["train", "configs/sine_debug.yaml", f"run.dir={tmp_path}", *overrides], check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()[-1:]
    assert line.startswith("distmaml train: error: one meta-iteration needs about ") and " GiB" in line
    assert "available (MemAvailable in /proc/meminfo" in line or "cgroup" in line
    import re

    assert re.search(expected, line), line
    assert "Traceback" not in proc.stderr and not (tmp_path / "checkpoints").exists()


def test_a_budget_names_what_would_fit():
    config, maml, params, batch = sine("inner.steps=20", "model.hidden=[256, 256]")

    def estimate(**inner):
        changed = dataclasses.replace(config, inner=dataclasses.replace(config.inner, **inner))
        return memory.estimate(maml, params, batch, build_inner(changed), engine)

    found = estimate()
    full, recomputed = found.peak_bytes, estimate(checkpoint="auto").peak_bytes
    assert recomputed < full / 2
    budget = (full + recomputed) / 2 / 2 ** 30
    tight = dataclasses.replace(config, engine=dataclasses.replace(config.engine, memory_budget=budget))
    with pytest.raises(ConfigError) as refused:
        memory.check_fits(maml, params, batch, tight, build_inner(tight), engine, 1,
                          torch.device("cpu"))
    message = str(refused.value)
    assert f"engine.memory_budget = {budget:g} GiB" in message
    assert "would fit: inner.checkpoint=auto (" in message and "inner.mode=first_order (" in message
    # The tasks' share of the peak scales with their number; the weights and Adam's state do not.
    most = int((budget * 2 ** 30 - found.fixed_bytes) // ((full - found.fixed_bytes) / 6))
    assert 1 <= most < 6 and f"train.meta_batch={most}, or more processes" in message
    roomy = dataclasses.replace(config, engine=dataclasses.replace(config.engine, memory_budget=2 * full / 2 ** 30))
    assert memory.check_fits(maml, params, batch, roomy, build_inner(roomy), engine, 1,
                             torch.device("cpu")).peak_bytes == full


USER_METHODS = """
import dataclasses
import torch
from distmaml.meta import SecondOrder

@dataclasses.dataclass(frozen=True)
class Hoarding(SecondOrder):  # keeps a large buffer alive through its hypergradient
    name = "hoarding"

    def hypergradient(self, problem, phi, tasks, inner, step_weights=None):
        hoard = torch.zeros(2 ** 28, dtype=torch.uint8, device=next(iter(phi.values())).device)
        result = super().hypergradient(problem, phi, tasks, inner, step_weights)
        return result._replace(task_losses=result.task_losses + 0 * hoard[:1].float())

@dataclasses.dataclass(frozen=True)
class Reading(SecondOrder):  # reads a value: possible on real tensors, not on the estimate's
    name = "reading"

    def hypergradient(self, problem, phi, tasks, inner, step_weights=None):
        result = super().hypergradient(problem, phi, tasks, inner, step_weights)
        float(result.task_losses.sum())
        return result
"""


def test_the_estimate_measures_the_run_s_own_method_and_skips_one_it_cannot_run(tmp_path, monkeypatch, capsys):
    from distmaml.commands import cli

    (tmp_path / "mine.py").write_text(USER_METHODS)
    monkeypatch.chdir(tmp_path)
    common = [str(REPO / "configs/sine_debug.yaml"), "train.iterations=1", "eval.at_end=false",
              "logging.progress=false", "engine.memory_budget=0.2", "inner.steps=5"]
    # A quarter of a GiB held by the method itself: over a 0.2 GiB budget only if the method is what the
    # estimate probes, also where it extrapolates from probes at fewer steps (K = 5).
    assert cli.main(["train", *common, f"run.dir={tmp_path / 'a'}", "inner.mode=mine.py:Hoarding"]) == 2
    assert "one meta-iteration needs about" in capsys.readouterr().err
    assert cli.main(["train", *common, f"run.dir={tmp_path / 'b'}", "inner.mode=mine.py:Reading"]) == 0
    assert "memory estimate skipped: inner.mode = " in capsys.readouterr().err


@pytest.mark.parametrize("fits", [True, False])
def test_checkpoint_auto_stores_the_unroll_where_it_fits_and_recomputes_where_it_does_not(fits, tmp_path, monkeypatch,
                                                                                           capfd):
    """The budget sits between the estimates of the stored and the recomputed unroll: the run stores
    (no recomputed segment) when the stored one fits, and recomputes when only the segments do."""
    import distmaml.meta.unrolling as unrolling
    from distmaml.commands.train import train

    overrides = ["inner.steps=16", "inner.checkpoint=auto"]
    config, maml, params, batch = sine(*overrides)
    auto = build_inner(config)
    stored = memory.estimate(maml, params, batch, dataclasses.replace(auto, checkpoint="none"), engine).peak_bytes
    segments = memory.estimate(maml, params, batch, auto, engine).peak_bytes
    assert segments < stored
    budget = stored * 1.05 if fits else (stored + segments) / 2
    segments_run = []
    real = unrolling.recomputed
    monkeypatch.setattr(unrolling, "recomputed", lambda *args: segments_run.append(1) or real(*args))
    train(load_config(REPO / "configs/sine_debug.yaml", [
        "model.hidden=[64, 64]", "task.support=30", "task.query=30", "train.meta_batch=6", *overrides,
        "train.iterations=2", "eval.at_end=false", f"engine.memory_budget={budget / 2 ** 30!r}", f"run.dir={tmp_path}"]))
    said = [line.split("INFO distmaml.train: ")[1] for line in capfd.readouterr().err.splitlines()
            if "inner.checkpoint = auto" in line]
    assert len(said) == 1 and said[0].startswith("inner.checkpoint = auto: " + ("stores" if fits else "recomputes"))
    assert bool(segments_run) is not fits
