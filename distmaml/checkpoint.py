"""The one module that knows about files of a run: checkpoints, their discovery, and preemption.

A checkpoint is plain data (tensors, numbers, strings, dicts) loaded with weights_only=True, so a
file from elsewhere cannot run code. It is written to a temporary name, flushed to disk and renamed,
so a crash at any moment leaves either the old set of checkpoints or the old set plus a complete new
one, never a torn file under a checkpoint's name.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import threading
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_NAME = re.compile(r"^ckpt_(\d{8,})\.pt$")
_REQUIRED = ("format_version", "iteration", "model", "optimizer", "config", "rng")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used, phrased as one line naming the file."""


def checkpoint_path(directory: str | Path, iteration: int) -> Path:
    return Path(directory) / f"ckpt_{iteration:08d}.pt"


def atomic_write(path: str | Path, write) -> None:
    """Call write(file_object) on a temporary file beside `path`, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def save_checkpoint(directory: str | Path, state: dict[str, Any], keep: int | None = None) -> Path:
    """Write `state` as ckpt_<iteration>.pt atomically; keep only the newest `keep` checkpoints."""
    path = checkpoint_path(directory, state["iteration"])
    atomic_write(path, lambda handle: torch.save({"format_version": FORMAT_VERSION, **state}, handle))
    if keep is not None:
        for old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    # Only the main process writes here, so a temporary file still lying around is from a writer
    # that was killed mid-save.
    for stale in Path(directory).glob(".ckpt_*.pt.tmp-*"):
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU without unpickling code; one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any failure means the file is unusable; say which
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line})") from None
    if not isinstance(state, dict) or any(key not in state for key in _REQUIRED):
        raise CheckpointError(f"{path}: not a distmaml checkpoint (needs keys {', '.join(_REQUIRED)})")
    if state["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {state['format_version']}, "
                              f"this distmaml reads {FORMAT_VERSION}")
    return state


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first (temporary files never match the name)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path) -> Path | None:
    """The newest checkpoint that loads; a damaged newest one is skipped with a warning."""
    for path in reversed(list_checkpoints(directory)):
        try:
            load_checkpoint(path)
            return path
        except CheckpointError as err:
            log.warning("skipping %s", err)
    return None


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class PreemptionWatch:
    """Turns SIGUSR1 / SIGTERM into a flag the training loop reads between iterations.

    SLURM sends SIGUSR1 (--signal=B:USR1@T) before a preemption or time limit and SIGTERM when it
    cancels; either way the loop finishes its iteration, saves and exits so the job can requeue.
    Handlers can only be installed from the main thread; elsewhere the watch is inert.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            log.warning("received %s: finishing this iteration, then checkpointing and exiting",
                        signal.Signals(signum).name)
        self.signum = signum

    def __enter__(self) -> "PreemptionWatch":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
