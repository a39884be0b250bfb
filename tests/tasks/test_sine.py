import math

import pytest
import torch

from distmaml.rng import STREAM_EVAL, STREAM_TRAIN, hash_u32, seed_words, uniform
from distmaml.tasks.sine import SineTasks


def test_hash_is_a_pure_function_of_its_keys_and_order_matters():
    a = hash_u32(1, 2, 3, torch.arange(6))
    assert torch.equal(a, hash_u32(1, 2, 3, torch.arange(6)))
    assert torch.equal(a, hash_u32(1, 2, torch.tensor(3), torch.arange(6)))  # int or tensor key alike
    assert not torch.equal(a, hash_u32(2, 1, 3, torch.arange(6)))
    assert a.dtype == torch.int64 and a.min() >= 0 and a.max() < 2 ** 32


def test_hash_rejects_keys_wider_than_32_bits():
    with pytest.raises(ValueError, match="32-bit"):
        hash_u32(2 ** 32)
    assert seed_words(2 ** 40 + 5) == (5, 2 ** 8)


def test_uniform_is_uniform():
    u = uniform(-1.0, 3.0, 9, torch.arange(100_000))
    assert u.min() >= -1.0 and u.max() < 3.0
    assert u.mean().item() == pytest.approx(1.0, abs=0.02)
    assert u.var().item() == pytest.approx(16 / 12, rel=0.02)
    counts = torch.histc(u, bins=10, min=-1, max=3)
    assert (counts - 10_000).abs().max() < 400  # ~4 standard deviations


def test_same_keys_same_task():
    family = SineTasks(seed=3)
    a = family.sample(STREAM_TRAIN, 17, torch.arange(25))
    b = family.sample(STREAM_TRAIN, 17, torch.arange(25))
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_shard_equals_slice_of_full_batch():
    family = SineTasks(seed=1)
    full = family.sample(STREAM_TRAIN, 5, torch.arange(25))
    for start, stop in [(0, 13), (13, 25), (7, 8), (24, 25)]:
        shard = family.sample(STREAM_TRAIN, 5, torch.arange(start, stop))
        for whole, part in zip(full, shard):
            assert torch.equal(whole[start:stop], part)


def test_iterations_seeds_and_streams_differ():
    family = SineTasks(seed=0)
    base = family.sample(STREAM_TRAIN, 0, torch.arange(4)).support_y
    assert not torch.equal(base, family.sample(STREAM_TRAIN, 1, torch.arange(4)).support_y)
    assert not torch.equal(base, family.sample(STREAM_EVAL, 0, torch.arange(4)).support_y)
    assert not torch.equal(base, SineTasks(seed=1).sample(STREAM_TRAIN, 0, torch.arange(4)).support_y)


def test_tasks_follow_the_paper_protocol():
    family = SineTasks(seed=0, support=10, query=7)
    batch = family.sample(STREAM_TRAIN, 0, torch.arange(2000))
    assert batch.support_x.shape == (2000, 10, 1) and batch.query_x.shape == (2000, 7, 1)
    x = torch.cat([batch.support_x, batch.query_x], 1)
    y = torch.cat([batch.support_y, batch.query_y], 1)
    assert x.min() >= -5 and x.max() < 5
    # Recover amplitude and phase from the data: y = A sin(x - phi) = a sin x + b cos x.
    basis = torch.stack([torch.sin(x[..., 0]), torch.cos(x[..., 0])], -1).double()
    coef = torch.linalg.lstsq(basis, y.double()).solution[..., 0]
    amplitude = coef.norm(dim=-1)
    phase = torch.atan2(-coef[:, 1], coef[:, 0])
    assert torch.allclose(basis @ coef[..., None], y.double(), atol=1e-4)  # exactly a sine
    assert amplitude.min() >= 0.1 - 1e-4 and amplitude.max() <= 5.0 + 1e-4
    assert amplitude.mean().item() == pytest.approx(2.55, abs=0.1)
    assert phase.min() >= -1e-4 and phase.max() <= math.pi + 1e-4


def test_changing_the_shot_count_keeps_the_task():
    family = SineTasks(seed=0)
    ten = family.sample(STREAM_EVAL, 0, torch.arange(5), support=10)
    five = family.sample(STREAM_EVAL, 0, torch.arange(5), support=5)
    assert torch.equal(ten.support_x[:, :5], five.support_x)
    assert torch.equal(ten.query_y, five.query_y)


def test_curve_matches_samples():
    family = SineTasks(seed=0)
    batch = family.sample(STREAM_EVAL, 0, torch.arange(3))
    truth = torch.stack([family.curve(STREAM_EVAL, 0, torch.arange(3)[i:i + 1], batch.support_x[i, :, 0])[0]
                         for i in range(3)])
    assert torch.allclose(truth, batch.support_y, atol=1e-6)


def test_sine_debug_s_task_stream_is_the_one_it_always_was():
    """The tasks configs/sine_debug.yaml trains on, pinned where they hold on every CPU: amplitudes,
    phases and inputs bit for bit (integer hashing, one rounding per float32 operation), the targets to
    float32 rounding (sin's last bit depends on the CPU's vector kernels)."""
    import json

    from distmaml.config import load_config
    from distmaml.tasks import build_task_family
    from conftest import REPO

    pinned = json.loads((REPO / "tests/data/sine_debug_task_stream.json").read_text())["iterations"]
    family = build_task_family(load_config(REPO / "configs/sine_debug.yaml"), "cpu")
    for iteration, expected in pinned.items():
        tasks = torch.arange(25)
        _, amplitude, phase = family._functions(STREAM_TRAIN, int(iteration), tasks)
        batch = family.sample(STREAM_TRAIN, int(iteration), tasks)
        drawn = {"amplitude": amplitude[:, 0], "phase": phase[:, 0], "support_x": batch.support_x[..., 0],
                 "query_x": batch.query_x[..., 0]}
        for name, value in drawn.items():
            assert torch.equal(value, torch.tensor(expected[name], dtype=torch.float32)), (iteration, name)
        for name, value in (("support_y", batch.support_y[..., 0]), ("query_y", batch.query_y[..., 0])):
            torch.testing.assert_close(value, torch.tensor(expected[name]), rtol=1e-6, atol=1e-6)
