import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from distmaml.errors import DiskFullError
from distmaml.run import checkpoint
from distmaml.run.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from conftest import REPO, run_dir_held_by_another_process


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
from distmaml.run import checkpoint
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
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tmp_path / "ckpt_00000001.pt")
    # One line that says why, without torch's advice to load it with weights_only=False.
    assert str(refused.value) == (f"{tmp_path / 'ckpt_00000001.pt'}: not a distmaml checkpoint: it holds Python "
                                  "objects (posix.system) beyond tensors and plain data, and loading them could "
                                  "run code; refused")


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


# ------------------------------------------------------------------ faults that once lost work


def short_run(run_dir, *overrides):
    from distmaml.commands.train import train
    from distmaml.config import load_config

    return train(load_config(REPO / "configs/sine_debug.yaml",
                             [f"run.dir={run_dir}", "logging.progress=false", "eval.at_end=false",
                              "train.log_every=10", *overrides]))


def newer_format(path):
    torch.save({**state(99), "format_version": checkpoint.FORMAT_VERSION + 1}, path)


@pytest.mark.parametrize("damage", ["truncated_newest", "random_bytes_above"])
def test_unusable_checkpoints_are_moved_aside_and_never_cost_a_new_one(tmp_path, damage):
    """Unreadable files numbered above the run once made pruning delete every new checkpoint."""
    ckpt = tmp_path / "checkpoints"
    short_run(tmp_path, "train.iterations=20", "train.checkpoint_every=10", "train.keep_checkpoints=1")
    assert [p.name for p in list_checkpoints(ckpt)] == ["ckpt_00000020.pt"]
    if damage == "truncated_newest":  # the only checkpoint, cut short as a full disk would
        data = (ckpt / "ckpt_00000020.pt").read_bytes()
        (ckpt / "ckpt_00000020.pt").write_bytes(data[:len(data) // 2])
        (tmp_path / "summary.json").unlink()  # a run whose last save failed wrote no summary
        bad = ["ckpt_00000020.pt"]
    elif damage == "random_bytes_above":  # more of them than keep_checkpoints
        bad = [f"ckpt_{i:08d}.pt" for i in (500, 600)]
        for name in bad:
            (ckpt / name).write_bytes(os.urandom(3000))
    summary = short_run(tmp_path, "train.iterations=40", "train.checkpoint_every=10", "train.keep_checkpoints=1")
    assert summary["status"] == "complete"
    names = sorted(p.name for p in ckpt.iterdir())
    assert names == sorted(["ckpt_00000040.pt", *(f"{name}.unusable" for name in bad)]), names
    assert load_checkpoint(ckpt / "ckpt_00000040.pt")["iteration"] == 40


def test_a_newer_distmaml_s_checkpoint_is_not_resumed_past_nor_moved(tmp_path):
    """It is probably fine, just not ours to read: resuming from an older one would silently redo work."""
    ckpt = tmp_path / "checkpoints"
    short_run(tmp_path, "train.iterations=20", "train.checkpoint_every=10", "train.keep_checkpoints=1")
    newer_format(ckpt / "ckpt_00000700.pt")
    with pytest.raises(CheckpointError, match=r"ckpt_00000700.pt: written by a newer distmaml \(checkpoint format "):
        short_run(tmp_path, "train.iterations=40", "train.checkpoint_every=10")
    assert sorted(p.name for p in ckpt.iterdir()) == ["ckpt_00000020.pt", "ckpt_00000700.pt"]


def test_pruning_keeps_files_numbered_above_and_the_newest_written(tmp_path):
    for i in (5, 10, 15, 90):  # 90: from an earlier run that went further
        save_checkpoint(tmp_path, state(i), keep=10)
    save_checkpoint(tmp_path, state(20), keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000015.pt", "ckpt_00000020.pt",
                                                             "ckpt_00000090.pt"]
    save_checkpoint(tmp_path, state(25), keep=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000025.pt", "ckpt_00000090.pt"]


def test_a_full_disk_during_a_save_says_so_and_keeps_the_previous_checkpoints(tmp_path, disk_full_after):
    save_checkpoint(tmp_path, state(1))
    before = (tmp_path / "ckpt_00000001.pt").read_bytes()
    disk_full_after(10_000)
    with pytest.raises(DiskFullError) as full:
        save_checkpoint(tmp_path, state(2, size=100_000), keep=1)
    message = str(full.value)
    assert message.startswith(f"{tmp_path / 'ckpt_00000002.pt'}: no space left on device (")
    assert "unexpected pos" not in message and "\n" not in message
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt_00000001.pt"]
    assert (tmp_path / "ckpt_00000001.pt").read_bytes() == before


@pytest.mark.parametrize("tamper, expected", [
    (lambda s: s.update(iteration="7"), "damaged checkpoint: 'iteration' must be a whole number >= 0, got '7'"),
    (lambda s: s.update(model=[1, 2]), "damaged checkpoint: 'model' must be a mapping, got list"),
    (lambda s: s["model"].update(w="weights"), "damaged checkpoint: 'model' must map names to tensors, got 'w': str"),
    (lambda s: s.update(rng={}), "damaged checkpoint: 'rng' must hold the generator state 'torch' as a tensor"),
])
def test_tampered_checkpoints_are_refused_in_one_line(tmp_path, tamper, expected):
    tampered = {"format_version": checkpoint.FORMAT_VERSION, **state(3)}
    tamper(tampered)
    torch.save(tampered, tmp_path / "ckpt_00000003.pt")
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(tmp_path / "ckpt_00000003.pt")
    assert str(refused.value) == f"{tmp_path / 'ckpt_00000003.pt'}: {expected}"


def test_weights_that_do_not_fit_their_config_are_refused_in_one_line(tmp_path):
    from conftest import run_cli

    short_run(tmp_path, "train.iterations=5", "train.checkpoint_every=5")
    path = tmp_path / "checkpoints/ckpt_00000005.pt"
    saved = torch.load(path, weights_only=True)
    saved["model"]["net.0.weight"] = torch.zeros(7, 1)  # the config says 40 hidden units
    save_checkpoint(path.parent, saved)  # with its checksum: a whole file, only not of this config
    proc = run_cli(["eval", str(tmp_path), "--tasks", "5"], check=False)
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"distmaml eval: error: {path}: its weights do not fit the model its config "
                                  "describes (")
    assert len(proc.stderr.strip().splitlines()) == 1


def test_a_second_trainer_in_one_run_dir_is_refused_naming_the_holder(tmp_path):
    with run_dir_held_by_another_process(tmp_path) as holder:
        with pytest.raises(CheckpointError) as refused:
            short_run(tmp_path, "train.iterations=5")
        assert str(refused.value) == (f"run.dir = {tmp_path}: in use by another trainer (PID {holder.pid}); wait "
                                      "for it to finish or choose another run.dir")
        assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
    assert short_run(tmp_path, "train.iterations=5")["status"] == "complete"


def test_a_run_dir_that_is_a_file_or_unwritable_is_one_line(tmp_path):
    (tmp_path / "taken").write_text("")
    with pytest.raises(CheckpointError, match=r"^run.dir = .*taken: exists and is not a directory$"):
        short_run(tmp_path / "taken")
    with pytest.raises(CheckpointError, match=r"^run.dir = .*taken/sub: cannot write there \(Not a directory\)$"):
        short_run(tmp_path / "taken" / "sub")


def test_ctrl_c_finishes_the_iteration_checkpoints_and_exits_130(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "distmaml", "train", "configs/sine_debug.yaml",
                             f"run.dir={tmp_path}", "train.iterations=100000", "train.checkpoint_every=0",
                             "train.log_every=10", "eval.at_end=false", "logging.progress=false"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "iter 20 " in line:
            proc.send_signal(signal.SIGINT)
            break
    rest = proc.stderr.read()
    assert proc.wait() == 130, rest
    assert "received SIGINT: finishing this iteration" in rest and "Traceback" not in rest
    (saved,) = list_checkpoints(tmp_path / "checkpoints")
    assert load_checkpoint(saved)["iteration"] >= 20
    summary = __import__("json").loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "preempted" and summary["iteration"] == load_checkpoint(saved)["iteration"]


def test_a_second_ctrl_c_exits_at_once(tmp_path):
    """Even while the first one waits for a long iteration to end (here: one of K = 2000 inner steps)."""
    proc = subprocess.Popen([sys.executable, "-m", "distmaml", "train", "configs/sine_debug.yaml",
                             f"run.dir={tmp_path}", "inner.steps=2000", "train.log_every=1", "eval.at_end=false",
                             "logging.progress=false"],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if "training " in line:
            break
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:
        if "received SIGINT" in line:
            break
    started = time.monotonic()
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=20) in (130, -signal.SIGINT)
    assert time.monotonic() - started < 5
    assert list_checkpoints(tmp_path / "checkpoints") == []


def test_a_checkpoint_whose_name_disagrees_with_its_iteration_is_moved_aside_not_resumed(tmp_path, capfd):
    """A copy renamed ckpt_00000800.pt that holds iteration 5 once won over the real newest, which
    pruning then deleted, and every later resume went back to iteration 5."""
    ckpt = tmp_path / "checkpoints"
    short_run(tmp_path, "train.iterations=15", "train.checkpoint_every=5", "train.keep_checkpoints=2")
    (ckpt / "ckpt_00000800.pt").write_bytes((ckpt / "ckpt_00000010.pt").read_bytes())
    capfd.readouterr()
    summary = short_run(tmp_path, "train.iterations=20", "train.checkpoint_every=5", "train.keep_checkpoints=2")
    err = capfd.readouterr().err
    assert f"{ckpt / 'ckpt_00000800.pt'}: holds iteration 10, not the 800 its name says; moved aside to " \
           "ckpt_00000800.pt.misnamed" in err
    assert f"resuming from {ckpt / 'ckpt_00000015.pt'} (iteration 15)" in err
    assert summary["iteration"] == 20
    assert sorted(p.name for p in ckpt.iterdir()) == ["ckpt_00000015.pt", "ckpt_00000020.pt",
                                                      "ckpt_00000800.pt.misnamed"]


def test_a_closed_terminal_and_a_full_disk_lose_nothing_and_resume_bit_for_bit(tmp_path):
    """SIGHUP (a closed terminal, a dropped login) mid-run: checkpoint, exit 129. Resumed where the
    disk fills up (a file-size limit, reported like a full disk) during a metrics append: one line,
    exit 1, the checkpoint as it was and metrics.jsonl whole. Resumed again: the weights of the
    uninterrupted run, bit for bit."""
    import json
    import resource

    common = ["train.iterations=60", "train.checkpoint_every=0", "train.log_every=1", "logging.sharpness=false"]
    short_run(tmp_path / "straight", *common)
    command = [sys.executable, "-m", "distmaml", "train", "configs/sine_debug.yaml", f"run.dir={tmp_path / 'cut'}",
               "logging.progress=false", "eval.at_end=false", *common]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    # As from a terminal: SIGHUP not ignored, even where this suite runs under nohup.
    proc = subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_DFL))
    for line in proc.stderr:
        if "iter 20 " in line:
            proc.send_signal(signal.SIGHUP)
            break
    rest = proc.stderr.read()
    assert proc.wait() == 128 + signal.SIGHUP, rest
    assert "received SIGHUP: finishing this iteration" in rest and "Traceback" not in rest
    (saved,) = list_checkpoints(tmp_path / "cut/checkpoints")
    stopped_at, saved_bytes = load_checkpoint(saved)["iteration"], saved.read_bytes()
    assert 20 <= stopped_at < 60

    metrics = tmp_path / "cut/metrics.jsonl"
    limit = metrics.stat().st_size + 2000  # room for a few more lines, not for the rest of the run

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, preexec_fn=small_files)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        f"distmaml train: error: {metrics}: file too large for this process's file-size limit (ulimit -f) or the "
        "file system; metrics.jsonl is as it was before this line")
    assert "Traceback" not in proc.stderr
    logged = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]  # every line whole
    assert logged == list(range(1, logged[-1] + 1)) and stopped_at < logged[-1] < 60
    assert list_checkpoints(tmp_path / "cut/checkpoints") == [saved] and saved.read_bytes() == saved_bytes

    assert short_run(tmp_path / "cut", *common)["iteration"] == 60
    straight = load_checkpoint(latest_checkpoint(tmp_path / "straight/checkpoints"))
    resumed = load_checkpoint(latest_checkpoint(tmp_path / "cut/checkpoints"))
    for part in ("model", "optimizer"):
        assert torch.equal(torch.cat([t.flatten() for t in _tensors(straight[part])]),
                           torch.cat([t.flatten() for t in _tensors(resumed[part])])), part
    assert [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()] == list(range(1, 61))


def _tensors(tree):
    from torch.utils._pytree import tree_flatten

    return [leaf.double() for leaf in tree_flatten(tree)[0] if torch.is_tensor(leaf)]


def test_a_checkpoint_folder_gone_read_only_mid_run_is_one_line_exit_1(tmp_path, failing_disk, capsys):
    import errno

    from distmaml.commands.cli import main

    short_run(tmp_path, "train.iterations=5")
    before = (tmp_path / "checkpoints/ckpt_00000005.pt").read_bytes()
    failing_disk(after=None, error=errno.EACCES, under=tmp_path / "checkpoints")
    code = main(["train", "configs/sine_debug.yaml", f"run.dir={tmp_path}", "train.iterations=10",
                 "eval.at_end=false", "logging.progress=false"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert err.strip().splitlines()[-1] == (
        f"distmaml train: error: {tmp_path / 'checkpoints/ckpt_00000010.pt'}: cannot write it (Permission denied); "
        "nothing was overwritten: the files already there are as they were")
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["ckpt_00000005.pt"]
    assert (tmp_path / "checkpoints/ckpt_00000005.pt").read_bytes() == before


# ------------------------------------------------------------------ values checked on load


def altered_message(path):
    return f"{path}: damaged checkpoint: its contents do not match the checksum written with it (altered after saving)"


def non_finite_message(path, name):
    return f"{path}: damaged checkpoint: holds non-finite values (NaN or inf) in {name}"


def with_nan(iteration):
    weights = torch.ones(3, 2)
    weights[1, 0] = float("nan")
    return {**state(iteration), "model": {"net.0.weight": weights, "net.0.bias": torch.zeros(3)}}


def flip_a_bit_of(path, value):
    """Flip one bit inside the stored bytes of a float32 tensor that holds `value`, as a bad disk would;
    torch.load itself does not notice."""
    data = bytearray(path.read_bytes())
    at = data.find(torch.tensor([value], dtype=torch.float32).numpy().tobytes())
    assert at > 0
    data[at + 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_checkpoint_altered_after_saving_is_refused_as_altered(tmp_path):
    path = save_checkpoint(tmp_path, state(3))
    saved = torch.load(path, weights_only=True)
    saved["model"]["w"][4] = 7.0  # another value, the checksum written with the old ones kept
    torch.save(saved, path)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    assert refused.value.damaged and str(refused.value) == altered_message(path)

    flipped = save_checkpoint(tmp_path, state(5))
    flip_a_bit_of(flipped, 5.0)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(flipped)
    assert refused.value.damaged and str(refused.value) == altered_message(flipped)
    assert load_checkpoint(save_checkpoint(tmp_path, state(6)))["iteration"] == 6  # an untouched one loads


def test_a_checkpoint_saved_with_non_finite_values_is_refused_naming_the_tensor(tmp_path):
    path = save_checkpoint(tmp_path, with_nan(3))
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    assert refused.value.damaged and str(refused.value) == non_finite_message(path, "model.net.0.weight")
    inf_in_optimizer = {**state(4), "optimizer": {"state": {0: {"exp_avg_sq": torch.tensor([1.0, float("inf")])}},
                                                  "param_groups": [{"lr": 0.1, "params": [0]}]}}
    path = save_checkpoint(tmp_path, inf_in_optimizer)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(path)
    assert str(refused.value) == non_finite_message(path, "optimizer.state.0.exp_avg_sq")


def test_a_model_buffer_may_hold_an_infinity_by_design(tmp_path):
    """A -inf attention mask or a running maximum that starts at -inf is no divergence: the buffers the
    checkpoint names are not held to finiteness, the weights still are."""
    masked = {**state(5), "model": {"w": torch.ones(3), "mask": torch.tensor([0.0, float("-inf")])}, "buffers": ["mask"]}
    assert torch.isinf(load_checkpoint(save_checkpoint(tmp_path, masked))["model"]["mask"][1])
    masked["model"]["w"] = torch.tensor([1.0, float("nan"), 1.0])
    with pytest.raises(CheckpointError, match="non-finite values"):
        load_checkpoint(save_checkpoint(tmp_path, {**masked, "iteration": 6}))


def test_saving_non_finite_values_prunes_none_of_the_good_checkpoints(tmp_path, caplog):
    """A resume needs the good checkpoints before a non-finite one: keep=1 must not delete them for it."""
    save_checkpoint(tmp_path, state(1), keep=1)
    with caplog.at_level("WARNING", logger="distmaml.checkpoint"):
        save_checkpoint(tmp_path, with_nan(2), keep=1)
    assert [r.getMessage() for r in caplog.records] == [
        f"{tmp_path / 'ckpt_00000002.pt'}: written with non-finite values (NaN or inf) in model.net.0.weight; it "
        "will be refused on load, and no older checkpoint was pruned for it"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_00000001.pt", "ckpt_00000002.pt"]
    assert latest_checkpoint(tmp_path).name == "ckpt_00000001.pt"


def test_latest_checkpoint_skips_or_moves_aside_altered_and_non_finite_ones(tmp_path, caplog):
    save_checkpoint(tmp_path, state(1))
    save_checkpoint(tmp_path, with_nan(2))
    flip_a_bit_of(save_checkpoint(tmp_path, state(3)), 3.0)
    caplog.clear()
    with caplog.at_level("WARNING", logger="distmaml.checkpoint"):
        assert latest_checkpoint(tmp_path).name == "ckpt_00000001.pt"
    assert [r.getMessage() for r in caplog.records] == [
        f"skipping {altered_message(tmp_path / 'ckpt_00000003.pt')}",
        f"skipping {non_finite_message(tmp_path / 'ckpt_00000002.pt', 'model.net.0.weight')}"]
    assert len(list_checkpoints(tmp_path)) == 3  # only skipped
    assert latest_checkpoint(tmp_path, move_aside=True).name == "ckpt_00000001.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000001.pt", "ckpt_00000002.pt.unusable",
                                                          "ckpt_00000003.pt.unusable"]


def test_latest_checkpoint_at_most_an_iteration_skips_newer_ones_without_moving_them(tmp_path):
    for i in (5, 10, 15):
        save_checkpoint(tmp_path, state(i))
    assert latest_checkpoint(tmp_path, at_most=15).name == "ckpt_00000015.pt"
    assert latest_checkpoint(tmp_path, at_most=14).name == "ckpt_00000010.pt"
    assert latest_checkpoint(tmp_path, at_most=4) is None
    save_checkpoint(tmp_path, with_nan(12))
    (tmp_path / "ckpt_00000020.pt").write_bytes(b"damaged, but past at_most")
    assert latest_checkpoint(tmp_path, move_aside=True, at_most=14).name == "ckpt_00000010.pt"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt_00000005.pt", "ckpt_00000010.pt",
                                                          "ckpt_00000012.pt.unusable", "ckpt_00000015.pt",
                                                          "ckpt_00000020.pt"]


def test_a_checkpoint_from_before_checksums_still_loads_and_is_still_checked_for_finiteness(tmp_path):
    old = tmp_path / "ckpt_00000003.pt"
    torch.save({"format_version": 2, **state(3)}, old)  # as distmaml wrote them before: no checksum
    assert load_checkpoint(old)["iteration"] == 3
    assert latest_checkpoint(tmp_path) == old
    old_nan = tmp_path / "ckpt_00000004.pt"
    torch.save({"format_version": 2, **with_nan(4)}, old_nan)
    with pytest.raises(CheckpointError) as refused:
        load_checkpoint(old_nan)
    assert refused.value.damaged and str(refused.value) == non_finite_message(old_nan, "model.net.0.weight")
    assert latest_checkpoint(tmp_path) == old


def test_a_damaged_newest_checkpoint_is_refused_by_eval_and_resumed_past(tmp_path, capfd):
    """A NaN written into the newest checkpoint after saving: eval refuses that file in one line and,
    given the run, evaluates the one before; a resume goes on from the one before and sets it aside."""
    from distmaml.commands.cli import main

    ckpt = tmp_path / "checkpoints"
    common = ["configs/sine_debug.yaml", f"run.dir={tmp_path}", "train.checkpoint_every=2", "train.log_every=2",
              "eval.at_end=false", "logging.progress=false"]
    assert main(["train", *common, "train.iterations=4"]) == 0
    newest = ckpt / "ckpt_00000004.pt"
    saved = torch.load(newest, weights_only=True)
    saved["model"]["net.0.weight"][0, 0] = float("nan")
    torch.save(saved, newest)
    capfd.readouterr()

    assert main(["eval", str(newest), "--tasks", "2", "--steps", "1"]) == 2
    err = capfd.readouterr().err
    assert err == f"distmaml eval: error: {altered_message(newest)}\n"
    assert main(["eval", str(tmp_path), "--tasks", "2", "--steps", "1"]) == 0
    err = capfd.readouterr().err
    assert f"skipping {altered_message(newest)}" in err and "Traceback" not in err

    assert main(["train", *common, "train.iterations=6"]) == 0
    err = capfd.readouterr().err
    assert f"{altered_message(newest)}; moved aside to ckpt_00000004.pt.unusable" in err
    assert f"resuming from {ckpt / 'ckpt_00000002.pt'} (iteration 2)" in err
    assert sorted(p.name for p in ckpt.iterdir()) == ["ckpt_00000002.pt", "ckpt_00000004.pt",
                                                      "ckpt_00000004.pt.unusable", "ckpt_00000006.pt"]
    assert load_checkpoint(ckpt / "ckpt_00000006.pt")["iteration"] == 6
