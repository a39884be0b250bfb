"""Writing files so that no reader ever sees half of one, and a full disk is named as such.

Checkpoints and the decoded-data cache both write through `atomic_write`.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import BinaryIO, Callable

from distmaml.errors import DiskFullError


def temporary_name(path: Path) -> Path:
    """Where `atomic_write` stages `path`: hidden, beside it, and unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def stale_temporaries(directory: str | Path, pattern: str) -> list[Path]:
    """Temporary files `atomic_write` left for names matching `pattern` (glob): from killed writers."""
    return sorted(Path(directory).glob(f".{pattern}.tmp-*"))


def _open_for_writing(path: Path) -> BinaryIO:
    return open(path, "wb")


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file_object) on a temporary file beside `path`, fsync it, then rename it into place.

    A failed write leaves `path` (and everything else) as it was; a full disk is reported as such,
    not as the writer's own symptom (torch.save says "unexpected pos 19712 vs 19600").
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = temporary_name(path)
    try:
        with _open_for_writing(temporary) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except Exception as err:
        if _disk_full(err):
            raise DiskFullError(f"{path}: no space left on device ({_free_mb(path.parent)} MB free in "
                                f"{path.parent}); nothing was overwritten: the files already there are as "
                                "they were") from None
        raise
    finally:
        temporary.unlink(missing_ok=True)
    directory = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(directory)  # make the rename itself durable
    finally:
        os.close(directory)


def _disk_full(err: BaseException | None) -> bool:
    """Whether a failure came from a full disk or quota, looking through the chain of exceptions."""
    while err is not None:
        if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        err = err.__cause__ or err.__context__
    return False


def _free_mb(directory: Path) -> str:
    try:
        stat = os.statvfs(directory)
    except OSError:
        return "?"
    return f"{stat.f_bavail * stat.f_frsize / 2 ** 20:.1f}"
