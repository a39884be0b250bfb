"""The run directory: one trainer at a time, writing only over what distmaml itself wrote there.

    with RunLock(run_dir) as lock:              # an flock on the directory itself
        claim(run_dir, resume, config_file)     # refuse, or move aside, files that are not this run's
        lock.write_pid()                        # for the message a second trainer gets

A run directory is marked as one by MARKER, written when a trainer first claims it (directories of
runs from before the marker are recognised by their checkpoints). A directory holding files of the
names a run writes, without that mark, is someone else's: it is refused unless run.resume=false
asks to start over there, which moves those files aside (into replaced-<time>/), never deletes them.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from distmaml.errors import CheckpointError, ConfigError
from distmaml.files import write_text
from distmaml.run.checkpoint import list_checkpoints

log = logging.getLogger(__name__)

MARKER = ".distmaml-run"
FALLBACK_LOCK = ".distmaml-lock"  # locked where the directory itself cannot be (NFS)
PID_FILE = "trainer.pid"  # the holder's PID, for the message a second trainer gets; not the lock itself
# What a trainer writes in its run directory (besides MARKER and PID_FILE).
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints", "wandb_id", "wandb")


class RunLock:
    """An exclusive lock on a run directory, so that two trainers never write one run.

    flock on the directory itself: the kernel releases it when the holder dies, kill -9 included,
    so a crashed run never leaves its directory locked, and no file can be deleted or replaced to
    break it (a lock on a file inside could: a second trainer would lock the new file). PID_FILE
    keeps the holder's PID for the message, written once the directory is known to be a run's.
    """

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        try:
            if self.run_dir.exists() and not self.run_dir.is_dir():
                raise CheckpointError(f"run.dir = {self.run_dir}: exists and is not a directory")
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.run_dir, os.O_RDONLY | os.O_DIRECTORY)
        except OSError as err:
            raise CheckpointError(f"run.dir = {self.run_dir}: cannot write there ({err.strerror})") from None
        try:
            fd = _locked(fd, self.run_dir)
        except BlockingIOError:
            try:
                holder = (self.run_dir / PID_FILE).read_text().strip() or "unknown"
            except OSError:
                holder = "unknown"
            raise CheckpointError(f"run.dir = {self.run_dir}: in use by another trainer (PID {holder}); wait for "
                                  "it to finish or choose another run.dir") from None
        except OSError as err:
            raise CheckpointError(f"run.dir = {self.run_dir}: cannot lock it ({err.strerror}), so two trainers "
                                  "could write it at once; choose a run.dir on a file system with locks") from None
        self._fd = fd
        return self

    def write_pid(self) -> None:
        try:
            (self.run_dir / PID_FILE).write_text(f"{os.getpid()}\n")
        except OSError as err:
            raise CheckpointError(f"run.dir = {self.run_dir}: cannot write there ({err.strerror})") from None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _locked(directory_fd: int, run_dir: Path) -> int:
    """An exclusive flock on the directory, or where the file system cannot lock a directory (NFS
    emulates flock with byte-range locks, which need a file open for writing) on FALLBACK_LOCK
    inside it, which deleting could break. Returns the locked descriptor; on failure closes
    everything and raises (BlockingIOError: another holder)."""
    import fcntl

    fd = directory_fd
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except OSError as err:
            os.close(fd)
            if isinstance(err, BlockingIOError) or fd != directory_fd:
                raise  # held by another trainer, or even the file inside cannot be locked
        fd = os.open(run_dir / FALLBACK_LOCK, os.O_RDWR | os.O_CREAT, 0o644)


def is_run(run_dir: Path) -> bool:
    """Whether distmaml wrote this directory as a run: its marker, or (runs from before the marker) checkpoints."""
    return (run_dir / MARKER).exists() or bool(list_checkpoints(run_dir / "checkpoints"))


def claim(run_dir: str | Path, resume, config_file: Path | None) -> None:
    """Make `run_dir` this run's, before anything is written there (the main process, under RunLock).

    Refuses a directory whose files distmaml did not write, and a run directory whose config.yaml is
    the config file given (it would be overwritten by the resolved config); with run.resume=false
    the files of an earlier run (or anyone's files of those names) are moved aside first.
    """
    run_dir = Path(run_dir)
    present = check_claimable(run_dir, resume, config_file)
    if resume is False and present:
        aside = _move_aside(run_dir, present)
        log.warning("run.resume = false: starting over in %s; moved the earlier %s into %s", run_dir,
                    ", ".join(present), aside)
    if not (run_dir / MARKER).exists():
        write_text(run_dir / MARKER, json.dumps({"written_by": "distmaml", "what": "a training run's directory",
                                                 "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")


def check_claimable(run_dir: str | Path, resume, config_file: Path | None) -> list[str]:
    """claim's refusals, reading only: the trainer asks before any other check and before it builds
    anything, so that a run refused for its directory has done no work, and claims (writes) only once
    every check passed. Returns the run files already present."""
    run_dir = Path(run_dir)
    try:
        run_dir.stat()
    except FileNotFoundError:
        return []
    except OSError as err:  # a name too long, a folder that cannot be searched
        raise CheckpointError(f"run.dir = {run_dir}: cannot write there ({err.strerror})") from None
    if not run_dir.is_dir():
        raise CheckpointError(f"run.dir = {run_dir}: exists and is not a directory")
    if config_file is not None and _same_file(config_file, run_dir / "config.yaml"):
        raise ConfigError(f"run.dir = {run_dir}: the run writes its resolved config to {run_dir / 'config.yaml'}, "
                          f"which is the config file given ({config_file}); choose another run.dir")
    present = [name for name in RUN_FILES if (run_dir / name).exists()]
    if present and resume is not False and not is_run(run_dir):
        raise ConfigError(f"run.dir = {run_dir}: holds {', '.join(present)} that distmaml did not write (it has no "
                          f"{MARKER}); choose another run.dir, or set run.resume=false to start a run there, moving "
                          "those files aside")
    return present


def refuse_finished_without_checkpoint(run_dir: str | Path) -> None:
    """A run directory about to start from iteration 0 must not hold a run that got further: its
    summary.json would be overwritten and its metrics.jsonl cut back (its checkpoints were deleted,
    or none could be read)."""
    summary = Path(run_dir) / "summary.json"
    if not summary.exists():
        return
    try:
        found = json.loads(summary.read_text())
        what = f"status {found['status']} at iteration {found['iteration']}"
    except (OSError, ValueError, TypeError, KeyError):
        what = "an unreadable summary.json"
    raise ConfigError(f"run.dir = {run_dir}: holds a run that got further ({what}) but no checkpoint to resume "
                      "from; set run.resume=false to start over there, moving its files aside, or choose another "
                      "run.dir")


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.exists() and b.exists() and os.path.samefile(a, b)
    except OSError:
        return False


def _move_aside(run_dir: Path, names: list[str]) -> Path:
    """Move `names` of `run_dir` into a new folder replaced-<time>[-n]/ beside them; return it."""
    stamp, number = time.strftime("%Y%m%d-%H%M%S"), 1
    aside = run_dir / f"replaced-{stamp}"
    while True:
        try:
            aside.mkdir()
            break
        except FileExistsError:
            number += 1
            aside = run_dir / f"replaced-{stamp}-{number}"
        except OSError as err:
            raise CheckpointError(f"run.dir = {run_dir}: cannot move the earlier files aside ({err.strerror})") \
                from None
    for name in names:
        try:
            os.replace(run_dir / name, aside / name)
        except OSError as err:
            raise CheckpointError(f"run.dir = {run_dir}: cannot move {name} aside into {aside} ({err.strerror})") \
                from None
    return aside


class Before:
    """What of a run directory existed before this trainer started, so that a run refused before its
    first iteration takes back all it wrote and leaves nothing on disk: the files of distmaml's own
    names it created, then the directory and its parents if it created them and they are empty.
    Nothing else is ever removed."""

    OWN = (*RUN_FILES, MARKER, PID_FILE, FALLBACK_LOCK)

    def __init__(self, run_dir: str | Path):
        self.run_dir = Path(run_dir)
        self.created: list[Path] = []  # the run directory and the parents it would create, innermost first
        path = self.run_dir.absolute()
        while not os.path.lexists(path) and path != path.parent:
            self.created.append(path)
            path = path.parent
        self.present = {name for name in self.OWN if os.path.lexists(self.run_dir / name)} if not self.created \
            else set()

    def restore(self) -> None:
        import shutil

        if not os.path.isdir(self.run_dir):
            return
        for name in self.OWN:
            path = self.run_dir / name
            if name in self.present or not os.path.lexists(path):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        for path in self.created:
            try:
                path.rmdir()
            except OSError:  # holds something the run did not write: left in place
                break
