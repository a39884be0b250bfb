"""The run directory: one trainer at a time, and nothing overwritten that distmaml did not write."""

import json
import shutil

import pytest

from distmaml.commands.cli import main
from distmaml.commands.train import train
from distmaml.config import ConfigError, load_config
from distmaml.errors import CheckpointError
from distmaml.run.run_dir import MARKER
from conftest import REPO, run_dir_held_by_another_process


def short_run(run_dir, *overrides):
    return train(load_config(REPO / "configs/sine_debug.yaml",
                             [f"run.dir={run_dir}", "logging.progress=false", "eval.at_end=false",
                              "train.log_every=5", "train.iterations=10", *overrides]))


def contents(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in sorted(folder.rglob("*"))
            if path.is_file()}


def test_deleting_the_run_directory_s_files_cannot_break_its_lock(tmp_path):
    with run_dir_held_by_another_process(tmp_path):
        for path in tmp_path.iterdir():  # the PID file included: the lock is on the directory itself
            path.unlink()
        with pytest.raises(CheckpointError, match=r"in use by another trainer \(PID unknown\)"):
            short_run(tmp_path)
        assert not (tmp_path / "metrics.jsonl").exists()


def test_files_distmaml_did_not_write_are_refused_and_moved_aside_only_on_request(tmp_path, capfd):
    (tmp_path / "metrics.jsonl").write_text("my own measurements\n")
    (tmp_path / "summary.json").write_text('{"mine": true}\n')
    before = contents(tmp_path)
    with pytest.raises(ConfigError) as refused:
        short_run(tmp_path)
    assert str(refused.value) == (f"run.dir = {tmp_path}: holds metrics.jsonl, summary.json that distmaml did not "
                                  f"write (it has no {MARKER}); choose another run.dir, or set run.resume=false to "
                                  "start a run there, moving those files aside")
    assert contents(tmp_path) == before
    assert short_run(tmp_path, "run.resume=false")["status"] == "complete"
    (aside,) = tmp_path.glob("replaced-*")
    assert contents(aside) == before
    assert f"run.resume = false: starting over in {tmp_path}; moved the earlier metrics.jsonl, summary.json into " \
           f"{aside}" in capfd.readouterr().err


def test_a_finished_run_whose_checkpoints_were_deleted_is_not_started_over_silently(tmp_path):
    short_run(tmp_path)
    shutil.rmtree(tmp_path / "checkpoints")  # to save space
    before = contents(tmp_path)
    with pytest.raises(ConfigError) as refused:
        short_run(tmp_path, "train.iterations=4")
    assert str(refused.value) == (f"run.dir = {tmp_path}: holds a run that got further (status complete at iteration "
                                  "10) but no checkpoint to resume from; set run.resume=false to start over there, "
                                  "moving its files aside, or choose another run.dir")
    assert contents(tmp_path) == before
    # Asked to start over, it does, and the finished run's record is kept beside the new one.
    assert short_run(tmp_path, "train.iterations=4", "run.resume=false")["iteration"] == 4
    (aside,) = tmp_path.glob("replaced-*")
    assert [json.loads(line)["iteration"] for line in (aside / "metrics.jsonl").read_text().splitlines()] == [5, 10]
    assert json.loads((aside / "summary.json").read_text())["iteration"] == 10


def test_the_config_file_given_is_never_where_the_resolved_config_goes(tmp_path, monkeypatch, capsys):
    """`cd exp; distmaml train config.yaml run.dir=.` once replaced the user's file by the resolved config."""
    mine = "# my notes\n" + (REPO / "configs/sine_debug.yaml").read_text()
    (tmp_path / "config.yaml").write_text(mine)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "config.yaml", "run.dir=.", "train.iterations=2"]) == 2
    assert capsys.readouterr().err.strip() == (
        "distmaml train: error: run.dir = .: the run writes its resolved config to config.yaml, which is the config "
        "file given (config.yaml); choose another run.dir")
    assert (tmp_path / "config.yaml").read_text() == mine
    assert [path.name for path in tmp_path.iterdir()] == ["config.yaml"]


def test_an_empty_or_impossible_run_dir_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = str(REPO / "configs/sine_debug.yaml")
    assert main(["train", config, "run.dir=", "train.iterations=2"]) == 2
    assert capsys.readouterr().err.strip() == ("distmaml train: error: command line: run.dir = '': must name a "
                                               "directory (. for the current one)")
    assert list(tmp_path.iterdir()) == []  # nothing written into the caller's working directory
    long = tmp_path / ("a" * 300)
    assert main(["train", config, f"run.dir={long}", "train.iterations=2"]) == 2
    assert capsys.readouterr().err.strip() == (f"distmaml train: error: run.dir = {long}: cannot write there (File "
                                               "name too long)")


def test_where_a_directory_cannot_be_locked_a_file_inside_is(tmp_path, monkeypatch):
    """NFS cannot flock a directory (its flock is a byte-range lock, which needs a file open for
    writing): the lock falls back to a file inside, and still refuses a second trainer."""
    import fcntl
    import os
    import stat

    from distmaml.run.run_dir import FALLBACK_LOCK, RunLock

    flock = fcntl.flock

    def like_nfs(fd, operation):
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(9, "Bad file descriptor")
        return flock(fd, operation)

    monkeypatch.setattr(fcntl, "flock", like_nfs)
    with RunLock(tmp_path / "run"):
        assert (tmp_path / "run" / FALLBACK_LOCK).exists()
        with pytest.raises(CheckpointError, match=r"in use by another trainer"):
            RunLock(tmp_path / "run").acquire()
    with RunLock(tmp_path / "run"):  # released with its holder
        pass


def test_going_on_from_an_older_checkpoint_moves_the_newer_ones_aside(tmp_path, capfd):
    """Resumed by hand from iteration 5 of a run that reached 10: the checkpoint at 10 belongs to the
    continuation being replaced. Left in place, the next automatic resume would jump back onto it."""
    short_run(tmp_path, "train.checkpoint_every=5", "train.keep_checkpoints=5")
    ckpts = tmp_path / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt_00000005.pt", "ckpt_00000010.pt"]
    capfd.readouterr()
    short_run(tmp_path, "train.checkpoint_every=5", "train.keep_checkpoints=5", "train.iterations=8",
              f"run.resume={ckpts / 'ckpt_00000005.pt'}")
    assert "the newer ckpt_00000010.pt belongs to the continuation it replaces" in capfd.readouterr().err
    assert sorted(p.name for p in ckpts.iterdir()) == ["ckpt_00000005.pt", "ckpt_00000008.pt",
                                                       "ckpt_00000010.pt.superseded"]
    assert short_run(tmp_path, "train.iterations=8")["iteration"] == 8  # auto: the new branch's newest
