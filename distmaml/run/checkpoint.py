"""The one module that knows about checkpoint files: writing, checking and finding them. The signals
that make a run write one are distmaml.run.signals'; the run directory around them is distmaml.run.run_dir's.

A checkpoint is plain data (tensors, numbers, strings, dicts) loaded with weights_only=True, so a
file from elsewhere cannot run code. It is written to a temporary name, flushed to disk and renamed,
so a crash at any moment leaves either the old set of checkpoints or the old set plus a complete new
one, never a torn file under a checkpoint's name. It carries a checksum of its contents and whether its
values were finite, so that a file altered since (a bad disk, a hand edit) or saved with NaN or inf is
refused on load, and a resume goes on from the newest good one instead of diverging again from it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from distmaml.errors import CheckpointError  # re-exported: distmaml.run.checkpoint.CheckpointError
from distmaml.files import atomic_write, stale_temporaries

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # 2: learned inner-rule parameters under "rule"; 1 (no "rule") still loads
# "checksum" and "finite" are optional keys, not a new format: files without them (written before)
# still load, and a distmaml from before them reads today's files, ignoring both.
_CHECKSUM = "sha256:"
_READABLE = (1, 2)
_NAME = re.compile(r"^ckpt_(\d{8,})\.pt$")
_REQUIRED = ("format_version", "iteration", "model", "optimizer", "config", "rng")


def checkpoint_path(directory: str | Path, iteration: int) -> Path:
    return Path(directory) / f"ckpt_{iteration:08d}.pt"


def save_checkpoint(directory: str | Path, state: dict[str, Any], keep: int | None = None) -> Path:
    """Write `state` as ckpt_<iteration>.pt atomically; keep the newest `keep` checkpoints up to it.

    Pruning only removes checkpoints numbered below the one just written: a file numbered above
    (left by an earlier run, or unreadable) is never counted, so the checkpoint just written is
    never the one removed.

    Along with `state` it stores a checksum of everything in it and whether all its floating-point
    tensors are finite, which load_checkpoint checks. A state that is not finite is still written
    (and refused on load), but prunes nothing: the good checkpoints before it are the ones a resume needs.
    """
    path = checkpoint_path(directory, state["iteration"])
    state = {key: value for key, value in state.items() if key not in ("checksum", "finite")}
    state = {"format_version": FORMAT_VERSION, **state}
    non_finite = _first_non_finite(_learned_values(state))
    state["finite"] = non_finite is None
    state["checksum"] = _checksum(state)
    atomic_write(path, lambda handle: torch.save(state, handle))
    if non_finite is not None:
        log.warning("%s: written with non-finite values (NaN or inf) in %s; it will be refused on load, and "
                    "no older checkpoint was pruned for it", path, non_finite)
    elif keep is not None:
        older = [p for p in list_checkpoints(directory) if checkpoint_iteration(p) < state["iteration"]]
        for old in older[:max(len(older) - (keep - 1), 0)]:
            old.unlink(missing_ok=True)
    # Only the main process writes here, so a temporary file still lying around is from a writer
    # that was killed mid-save.
    for stale in stale_temporaries(directory, "ckpt_*.pt"):
        stale.unlink(missing_ok=True)
    return path


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Read a checkpoint onto the CPU without unpickling code; one-line errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        # Read first, then parse: an OSError is then the file system's (retry later, the file may be
        # fine), and anything torch raises is the content's (a truncated zip surfaces as EINVAL).
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot read the checkpoint ({err.strerror or err})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's own message advises loading with weights_only=False, which would run that code.
        found = re.search(r"GLOBAL ([\w.]+)", str(err), re.IGNORECASE)
        if not found:
            raise CheckpointError(f"{path}: not a readable checkpoint (not a file written by torch.save)",
                                  damaged=True) from None
        raise CheckpointError(f"{path}: not a distmaml checkpoint: it holds Python objects ({found.group(1)}) beyond "
                              "tensors and plain data, and loading them could run code; refused", damaged=True) from None
    except Exception as err:  # noqa: BLE001 - the content is unusable; say how
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: not a readable checkpoint ({first_line})", damaged=True) from None
    if not isinstance(state, dict) or any(key not in state for key in _REQUIRED):
        raise CheckpointError(f"{path}: not a distmaml checkpoint (needs keys {', '.join(_REQUIRED)})", damaged=True)
    if state["format_version"] not in _READABLE:
        raise CheckpointError(f"{path}: written by a newer distmaml (checkpoint format {state['format_version']}; "
                              f"this one reads {' and '.join(map(str, _READABLE))}): resume it with that version, or "
                              "move it away to resume from the checkpoints before it")
    problem = _content_problem(state) or _type_problem(state)
    if problem:
        raise CheckpointError(f"{path}: damaged checkpoint: {problem}", damaged=True)
    state.setdefault("rule", {})
    return state


def _content_problem(state: dict[str, Any]) -> str | None:
    """Whether a loaded checkpoint's contents are what was saved and finite, or what is wrong.

    A file from before checksums has none to compare; its values are still checked."""
    if "checksum" in state and state["checksum"] != _checksum(state):
        return "its contents do not match the checksum written with it (altered after saving)"
    non_finite = _first_non_finite(_learned_values(state))
    if non_finite is not None:
        return f"holds non-finite values (NaN or inf) in {non_finite}"
    if state.get("finite", True) is not True:
        return "was saved with non-finite values (NaN or inf)"
    return None


def _checksum(state: dict[str, Any]) -> str:
    """sha256 over everything in `state` but its "checksum": each tensor's dtype, shape and bytes, and
    the plain data, dict keys in sorted order, so that the same contents always give the same digest."""
    digest = hashlib.sha256()
    _digest(digest, {key: value for key, value in state.items() if key != "checksum"})
    return _CHECKSUM + digest.hexdigest()


def _digest(digest: Any, value: Any) -> None:
    # Each item is tagged with its kind and containers with their length, so that different
    # structures cannot run together into the same byte stream.
    if torch.is_tensor(value):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"tensor {tensor.dtype} {tuple(tensor.shape)}\n".encode())
        # The raw bytes, not a pickle: pickling would hash torch's framing too, and cost a copy more.
        # Viewed as bytes first, since numpy has no bfloat16.
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(value, dict):  # an OrderedDict too: state_dict()'s order is not the contents
        digest.update(f"dict {len(value)}\n".encode())
        for key in _in_order(value):
            _digest(digest, key)
            _digest(digest, value[key])
    elif isinstance(value, (list, tuple)):  # torch.Size too
        digest.update(f"list {len(value)}\n".encode())
        for item in value:
            _digest(digest, item)
    else:  # None, bool, int, float, str, torch.dtype: repr tells them apart and round-trips floats
        digest.update(f"{type(value).__name__} {value!r}\n".encode())


def _in_order(mapping: dict) -> list:
    """A mapping's keys in one order whatever order it was built in (names and optimizer indices alike)."""
    return sorted(mapping, key=lambda key: (type(key).__name__, repr(key)))


def _learned_values(state: dict[str, Any]) -> dict[str, Any]:
    """The state less the model's buffers it names under "buffers": a buffer may hold an infinity by
    design (a -inf attention mask, a running maximum that starts at -inf), the weights and the
    optimizer's moments never."""
    buffers = set(state.get("buffers", ()))
    model = state.get("model")
    if not buffers or not isinstance(model, dict):
        return state
    return {**state, "model": {name: value for name, value in model.items() if name not in buffers}}


def _first_non_finite(value: Any, name: str = "") -> str | None:
    """The dotted name (model.net.0.weight) of the first floating-point tensor in `value`, in sorted
    key order, that holds a NaN or an infinity; None if there is none."""
    if torch.is_tensor(value):
        floating = value.is_floating_point() or value.is_complex()
        return name if floating and not bool(torch.isfinite(value.detach()).all()) else None
    if isinstance(value, dict):
        items = [(key, value[key]) for key in _in_order(value)]
    elif isinstance(value, (list, tuple)):
        items = list(enumerate(value))
    else:
        return None
    for key, item in items:
        found = _first_non_finite(item, f"{name}.{key}" if name else str(key))
        if found is not None:
            return found
    return None


def _type_problem(state: dict[str, Any]) -> str | None:
    """What in a loaded checkpoint does not have the type distmaml wrote, or None."""
    if not isinstance(state["iteration"], int) or isinstance(state["iteration"], bool) or state["iteration"] < 0:
        return f"'iteration' must be a whole number >= 0, got {state['iteration']!r}"
    for key in ("model", "optimizer", "config", "rng"):
        if not isinstance(state[key], dict):
            return f"'{key}' must be a mapping, got {type(state[key]).__name__}"
    for key in ("model", "rule"):
        if not isinstance(state.get(key, {}), dict):
            return f"'{key}' must be a mapping, got {type(state[key]).__name__}"
        for name, value in state.get(key, {}).items():
            if not isinstance(name, str) or not torch.is_tensor(value):
                return f"'{key}' must map names to tensors, got {name!r}: {type(value).__name__}"
    if not torch.is_tensor(state["rng"].get("torch")):
        return "'rng' must hold the generator state 'torch' as a tensor"
    return None


def load_weights(module: torch.nn.Module | torch.optim.Optimizer, saved: dict[str, Any], path: Path) -> None:
    """module.load_state_dict(saved), with a one-line error naming the file when they do not fit."""
    try:
        module.load_state_dict(saved)
    except (RuntimeError, ValueError, KeyError, TypeError) as err:
        what = "optimizer state" if isinstance(module, torch.optim.Optimizer) else "weights"
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{path}: its {what} do not fit the model its config describes ({first_line})") \
            from None


def checkpoint_iteration(path: Path) -> int:
    return int(_NAME.match(path.name).group(1))


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first (temporary files never match the name)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := _NAME.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(directory: str | Path, move_aside: bool = False, at_most: int | None = None) -> Path | None:
    """The newest checkpoint that loads and holds the iteration its name says; with `at_most`, the
    newest such of those numbered at most that iteration (the ones above are passed over unread, and
    never moved aside for it: e.g. the last good checkpoint before a given iteration went wrong).

    A newer damaged one is skipped with a warning, and so is one whose name disagrees with the
    iteration stored in it (a copy renamed by hand: the iteration inside is the truth, and its name
    would put it first, and have pruning delete the real newest). With `move_aside` (the trainer's
    main process) such a file is also renamed <name>.unusable or <name>.misnamed, so that no later
    listing sees it, and the warning says so. One that cannot be read right now, or was written by
    a newer distmaml, is not passed over: its error is raised, rather than a run silently resuming
    from an older checkpoint. A file altered since it was saved, or saved with non-finite values, is
    damaged like a truncated one.
    """
    for path in reversed(list_checkpoints(directory)):
        if at_most is not None and checkpoint_iteration(path) > at_most:
            continue
        try:
            stored = load_checkpoint(path)["iteration"]
        except CheckpointError as err:
            if not path.exists() and not move_aside:
                continue  # moved aside by the main process while this rank listed the folder
            if not err.damaged:
                raise
            problem, suffix = str(err), "unusable"
        else:
            if stored == checkpoint_iteration(path):
                return path
            problem, suffix = f"{path}: holds iteration {stored}, not the {checkpoint_iteration(path)} its name says", \
                "misnamed"
        if not move_aside:
            log.warning("skipping %s", problem)
            continue
        set_aside(path, suffix, problem)
    return None


def set_aside(path: Path, suffix: str, problem: str) -> Path:
    """Rename checkpoint `path` to <name>.<suffix>, so that no listing counts it again, and warn with
    `problem` (why); never deletes it. A rename that fails is one line."""
    aside = path.with_name(f"{path.name}.{suffix}")
    try:
        os.replace(path, aside)
    except OSError as err:
        raise CheckpointError(f"{problem}; moving it aside to {aside.name} failed ({err.strerror}): move or "
                              "delete it by hand") from None
    log.warning("%s; moved aside to %s", problem, aside.name)
    return aside


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
