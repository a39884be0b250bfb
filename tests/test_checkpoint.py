import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distmaml import checkpoint
from distmaml.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from conftest import REPO


def state(iteration, size=10):
    return {"iteration": iteration, "model": {"w": torch.full((size,), float(iteration))}, "optimizer": {},
            "config": {"run": {"dir": "x"}}, "rng": checkpoint.rng_state()}


def test_save_load_roundtrip_and_pruning(tmp_path):
    for i in (5, 10, 15, 20):
        save_checkpoint(tmp_path, state(i), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000015.pt", "ckpt_00000020.pt"]
    loaded = load_checkpoint(latest_checkpoint(tmp_path))
    assert loaded["iteration"] == 20 and torch.equal(loaded["model"]["w"], torch.full((10,), 20.0))
    assert not [p for p in tmp_path.iterdir() if "tmp" in p.name]


def test_failed_save_leaves_previous_checkpoint_intact(tmp_path, monkeypatch):
    save_checkpoint(tmp_path, state(1))

    def torn_save(obj, handle):
        handle.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path, state(2))
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_00000001.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["iteration"] == 1


WRITER = """
import sys, torch
from distmaml import checkpoint
for i in range(1, 10_000):
    state = {"iteration": i, "model": {"w": torch.full((4_000_000,), float(i))}, "optimizer": {},
             "config": {}, "rng": checkpoint.rng_state()}
    checkpoint.save_checkpoint(sys.argv[1], state, keep=3)
    print(i, flush=True)
"""


def test_process_killed_while_saving_never_leaves_a_torn_checkpoint(tmp_path):
    """SIGKILL a process that keeps writing 16 MB checkpoints; whenever it dies, what is there loads."""
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    for _ in range(3):
        proc.stdout.readline()  # let a few saves complete, then kill it during the next ones
    time.sleep(0.05)
    proc.kill()
    proc.wait()
    found = list_checkpoints(tmp_path)
    assert found
    for path in found:
        loaded = load_checkpoint(path)
        assert torch.equal(loaded["model"]["w"], torch.full((4_000_000,), float(loaded["iteration"])))
    assert load_checkpoint(latest_checkpoint(tmp_path))["iteration"] >= 3
    save_checkpoint(tmp_path, state(10_000), keep=3)  # the next save sweeps the killed writer's leftovers
    assert sorted(p.name for p in tmp_path.iterdir())[-1] == "ckpt_00010000.pt"
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]


def test_unusable_files_give_one_line_errors(tmp_path):
    bad = tmp_path / "ckpt_00000009.pt"
    bad.write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"ckpt_00000009.pt: not a readable checkpoint"):
        load_checkpoint(bad)
    torch.save({"weights": 1}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other.pt: not a distmaml checkpoint"):
        load_checkpoint(tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"missing.pt: no such checkpoint file"):
        load_checkpoint(tmp_path / "missing.pt")
    # A damaged newest checkpoint is skipped in favour of the previous complete one.
    save_checkpoint(tmp_path, state(3))
    assert latest_checkpoint(tmp_path).name == "ckpt_00000003.pt"
    save_checkpoint(tmp_path, state(4))
    (tmp_path / "ckpt_00000004.pt").write_bytes(b"damaged")
    assert latest_checkpoint(tmp_path).name == "ckpt_00000003.pt"


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_checkpoints_cannot_run_code(tmp_path):
    torch.save({**state(1), "payload": Evil()}, tmp_path / "ckpt_00000001.pt")
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(tmp_path / "ckpt_00000001.pt")


def test_preemption_signal_checkpoints_and_resume_matches_uninterrupted_run(tmp_path):
    """SIGUSR1 mid-run: the trainer checkpoints and exits; a restart resumes to the same weights."""
    common = ["configs/sine_debug.yaml", "train.iterations=300", "train.checkpoint_every=0", "eval.at_end=false",
              "train.lr_schedule=cosine", "inner.steps=2", "logging.progress=false"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-m", "distmaml", "train", *common, f"run.dir={tmp_path / 'straight'}"],
                   check=True, env=env, capture_output=True)
    proc = subprocess.Popen([sys.executable, "-m", "distmaml", "train", *common, f"run.dir={tmp_path / 'cut'}",
                             "train.log_every=10"], env=env, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:  # wait until it is training, then preempt it
        if "iter 20 " in line:
            proc.send_signal(signal.SIGUSR1)
            break
    rest = proc.stderr.read()
    assert proc.wait() == 128 + signal.SIGUSR1, rest
    assert "stopped at iteration" in rest
    cut = list_checkpoints(tmp_path / "cut/checkpoints")
    assert len(cut) == 1 and 20 <= load_checkpoint(cut[0])["iteration"] < 300
    subprocess.run([sys.executable, "-m", "distmaml", "train", *common, f"run.dir={tmp_path / 'cut'}"],
                   check=True, env=env, capture_output=True)
    straight = load_checkpoint(latest_checkpoint(tmp_path / "straight/checkpoints"))
    resumed = load_checkpoint(latest_checkpoint(tmp_path / "cut/checkpoints"))
    assert resumed["iteration"] == straight["iteration"] == 300
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
