"""What the trainer checks before its first iteration: a user's family on its first batch (shapes,
dtype, finite values, purity), the problem's fit to it, and memory, each refused in one line."""


import pytest
import torch

from distmaml.commands.train import train
from distmaml.config import ConfigError, load_config
from conftest import REPO, Planted


def polynomials(tmp_path, family, *overrides):
    return load_config(REPO / "examples/polynomials.yaml",
                       [f"task.family={__name__}:{family}", f"run.dir={tmp_path}", "train.iterations=3",
                        "train.log_every=1", "logging.progress=false", "eval.at_end=false", *overrides])


class NoFeatureDimension(Planted):
    def change(self, batch, iteration):
        return batch._replace(support_x=batch.support_x[..., 0], query_x=batch.query_x[..., 0])


class FewerTargets(Planted):
    def change(self, batch, iteration):
        return batch._replace(support_y=batch.support_y[:, 1:])


class TargetsWithoutTheirDimension(Planted):
    """Targets [n, k] for outputs [n, k, 1]: an MSE broadcasts them to [k, k] and trains on nonsense."""

    def change(self, batch, iteration):
        return batch._replace(support_y=batch.support_y[..., 0], query_y=batch.query_y[..., 0])


class PlainTuple(Planted):
    def change(self, batch, iteration):
        return tuple(batch)


class Float64(Planted):
    def change(self, batch, iteration):
        return batch._replace(support_x=batch.support_x.double())


class NaNTargets(Planted):
    def change(self, batch, iteration):
        task = torch.arange(len(batch.query_y), device=batch.query_y.device)[:, None, None]
        return batch._replace(query_y=batch.query_y.masked_fill(task == 2, float("nan")))


class RandomNoise(Planted):
    def change(self, batch, iteration):
        return batch._replace(support_y=batch.support_y + torch.rand_like(batch.support_y))


class IgnoresSupport(Planted):
    def sample(self, stream, iteration, indices, support=None, query=None):
        return super().sample(stream, iteration, indices, None, query)

    def change(self, batch, iteration):
        return batch


WHERE = f"task.family = '{__name__}:"


@pytest.mark.parametrize("family, expected", [
    ("NoFeatureDimension", f"{WHERE}NoFeatureDimension': NoFeatureDimension: sample(...).support_x is (6, 10): () per "
                           "example, but input_shape says (1,) (tasks, examples, *input_shape)"),
    ("FewerTargets", f"{WHERE}FewerTargets': FewerTargets: sample(...).support_y is (6, 9, 1) for 10 examples in "
                     "support_x (6, 10, 1); each example needs its target"),
    ("Float64", f"{WHERE}Float64': Float64: sample(...).support_x is float64, but the run computes in float32 "
                "(engine.dtype); sample in the dtype from_config is given"),
    ("NaNTargets", f"{WHERE}NaNTargets': NaNTargets: sample(...).query_y holds 10 values that are not finite (NaN or "
                   "infinite), in task(s) [2]; the data, not the training, would be at fault"),
    ("RandomNoise", f"{WHERE}RandomNoise': RandomNoise: two calls of sample() with the same (stream, iteration, "
                    "indices) gave different tasks; draw from (seed, stream, iteration, index)"),
    ("IgnoresSupport", f"{WHERE}IgnoresSupport': IgnoresSupport: sample(..., support=9) gave as many support examples "
                       "as its default support = 10; it must honour support= (evaluation asks for eval.shots and "
                       "eval.query)"),
    ("PlainTuple", "problem.name = 'maml': MAML: needs tasks with support_x, support_y, query_x, query_y (a "
                   "distmaml.meta.TaskBatch); the task family gives a tuple"),
    ("TargetsWithoutTheirDimension", "problem.name = 'maml': MAML: the model's outputs for support_x are (10, 1) per "
                                     "task but support_y is (10,): they must have the same shape, or the loss "
                                     "broadcasts them"),
])
def test_a_broken_user_family_is_refused_on_the_first_batch_naming_its_class(tmp_path, family, expected):
    with pytest.raises(ConfigError) as refused:
        train(polynomials(tmp_path, family))
    assert str(refused.value).startswith(expected), str(refused.value)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


class NaNFromIteration2(Planted):
    def change(self, batch, iteration):
        return batch._replace(support_y=batch.support_y * (float("nan") if int(iteration) >= 2 else 1.0))


def test_data_that_turns_non_finite_later_is_blamed_not_the_learning_rate(tmp_path):
    summary = train(polynomials(tmp_path, "NaNFromIteration2", "train.checkpoint_every=1"))
    assert summary["status"] == "diverged" and summary["diverged_at"] == 3
    assert summary["error"].startswith(
        "training diverged at iteration 3: the tasks of that iteration hold values that are not finite "
        "(NaNFromIteration2 gave support_y with NaN or infinite entries in task(s) 0, 1, 2, 3, 4, ...); stopped "
        "without writing a checkpoint; the last good checkpoint is ")
    assert summary["error"].endswith("(the data is at fault, not the learning rate)")


def test_a_run_refused_for_memory_never_builds_its_model_for_real(tmp_path, monkeypatch):
    """Refused at engine.memory_budget = 0.2, it once first built a 1.4 GB model."""
    import distmaml.commands.train

    built = []
    real_build = distmaml.commands.train.build
    monkeypatch.setattr(distmaml.commands.train, "build", lambda config, device, *rest: built.append(device) or real_build(
        config, device, *rest))
    config = load_config(REPO / "configs/sine_debug.yaml", [f"run.dir={tmp_path}", "model.hidden=[4000, 4000]",
                                                            "engine.memory_budget=0.2"])
    with pytest.raises(ConfigError, match=r"^one meta-iteration needs about 4\.\d\d GiB .* more than the 205 MiB "
                                          r"available \(engine.memory_budget = 0.2 GiB\)"):
        train(config)
    assert built == []  # nothing built on the training device: the estimate ran on a `meta` copy


def test_the_evaluation_at_the_end_is_checked_before_training(tmp_path):
    config = load_config(REPO / "configs/sine_debug.yaml", [f"run.dir={tmp_path}", "eval.tasks=1000000000"])
    with pytest.raises(ConfigError) as refused:
        train(config)
    message = str(refused.value)
    assert message.startswith("eval.tasks = 1000000000, eval.query = 100: evaluating needs about ")
    assert "of it for the results of 1000000000 tasks), more than the " in message
    assert message.endswith("; fewer eval.tasks would fit, or engine.memory_check=false skips this check")
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_the_address_space_limit_counts_as_memory_available(tmp_path, monkeypatch):
    """`ulimit -v 3000000` then model.hidden=[4000, 4000] was accepted at 4.8 GiB, then failed in the
    allocator with an 87-line traceback."""
    import resource
    from pathlib import Path

    from distmaml import machine_memory

    status = Path("/proc/self/status").read_text()
    virtual = int(next(line for line in status.splitlines() if line.startswith("VmSize:")).split()[1]) * 1024
    real = resource.getrlimit
    monkeypatch.setattr(resource, "getrlimit", lambda which: (virtual + 2 ** 30,) * 2 if which == resource.RLIMIT_AS
                        else real(which))
    available, source = machine_memory.available_bytes(torch.device("cpu"))
    assert source == "this process's address-space limit, ulimit -v" and available < 2 ** 31
    config = load_config(REPO / "configs/sine_debug.yaml", [f"run.dir={tmp_path}", "model.hidden=[4000, 4000]",
                                                            "train.iterations=0", "eval.at_end=false"])
    with pytest.raises(ConfigError, match=r"^one meta-iteration needs about 4\.\d\d GiB .*, more than the .* available "
                                          r"\(this process's address-space limit, ulimit -v\)"):
        train(config)


class LossReadsValues(Planted):
    def change(self, batch, iteration):
        return batch

    def loss(self, prediction, target):
        # Reads a value: fine on real tensors, impossible on the meta tensors of the memory estimate.
        return super().loss(prediction, target) / max(float(target.abs().max()), 1.0)


def test_a_family_loss_that_cannot_run_on_shapes_alone_is_one_line_naming_the_way_out(tmp_path):
    with pytest.raises(ConfigError) as refused:
        train(polynomials(tmp_path, "LossReadsValues"))
    assert str(refused.value).startswith(f"task.family = '{__name__}:LossReadsValues': LossReadsValues: "
                                         "loss(prediction, target) failed on the meta device (shapes only, for the "
                                         "memory estimate; engine.memory_check=false skips it): "), str(refused.value)
    assert "\n" not in str(refused.value) and not (tmp_path / "checkpoints").exists()
