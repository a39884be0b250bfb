"""Writing files so that no reader ever sees half of one, and a failed write is named in one line.

Checkpoints, the run directory's files, results and the decoded-data cache all write through
`atomic_write` (or `append_text`, for metrics.jsonl). Output paths a command was given are checked
with `check_file_path` / `check_folder_path` before the work, so that a long run never ends on a
path it could not write.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable

from distmaml.errors import ConfigError, DiskFullError, WriteError

# Failures that mean "no room": the disk, the user's quota, or this process's file-size limit
# (ulimit -f; Python ignores SIGXFSZ, so the write fails with EFBIG instead of killing the process).
_NO_ROOM = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
            errno.EFBIG: "file too large for this process's file-size limit (ulimit -f) or the file system"}


def temporary_name(path: Path) -> Path:
    """Where `atomic_write` stages `path`: hidden, beside it, and unique to this process."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def stale_temporaries(directory: str | Path, pattern: str) -> list[Path]:
    """Temporary files `atomic_write` left for names matching `pattern` (glob): from killed writers."""
    return sorted(Path(directory).glob(f".{pattern}.tmp-*"))


def _open_for_writing(path: Path) -> BinaryIO:
    return open(path, "wb")


def _open_for_appending(path: Path) -> BinaryIO:
    return open(path, "ab", buffering=0)  # unbuffered: a failed write is seen at once, and can be undone


def atomic_write(path: str | Path, write: Callable[[BinaryIO], object]) -> None:
    """Call write(file_object) on a temporary file beside `path`, fsync it, then rename it into place.

    A failed write leaves `path` (and everything else) as it was and raises a one-line WriteError
    (DiskFullError for a full disk, quota or file-size limit), not the writer's own symptom
    (torch.save says "unexpected pos 19712 vs 19600").
    """
    path = Path(path)
    kind = _kind(path)
    if kind == "stream":  # /dev/stdout, a pipe: written into, as a rename would replace it with a file
        try:
            with open(path, "wb") as handle:
                write(handle)
        except Exception as err:
            raise (write_error(path, err, "the stream may hold part of it") or err) from None
        return
    if kind == "file":
        path = path.resolve()  # a link to a file: the file is replaced, the link stays
    temporary = temporary_name(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _open_for_writing(temporary) as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)  # make the rename itself durable
        finally:
            os.close(directory)
    except Exception as err:
        failure = write_error(path, err, "nothing was overwritten: the files already there are as they were")
        if failure is None:
            raise
        raise failure from None
    finally:
        try:
            temporary.unlink(missing_ok=True)
        except OSError:
            pass  # the folder itself is gone or unreadable: the error above says so


def _kind(path: Path) -> str | None:
    """What `path` names (links followed): "file", "directory", "stream" (anything else), or None."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return "file" if stat.S_ISREG(mode) else "directory" if stat.S_ISDIR(mode) else "stream"


def write_text(path: str | Path, text: str) -> None:
    """`text` as the whole content of `path`, written atomically."""
    write_bytes(path, text.encode())


def write_bytes(path: str | Path, data: bytes) -> None:
    """`data` as the whole content of `path`, written atomically."""
    atomic_write(path, lambda handle: handle.write(data))


def write_figure(path: str | Path, figure, **savefig) -> None:
    """A matplotlib figure saved to `path` atomically (savefig's own writes could leave half an image)."""
    import io

    buffer = io.BytesIO()
    figure.savefig(buffer, **savefig)
    write_bytes(path, buffer.getvalue())


def append_text(path: str | Path, text: str) -> None:
    """Append `text` to `path`; a write that fails is cut back off, so the file never ends in half a line."""
    path = Path(path)
    try:
        with _open_for_appending(path) as handle:
            size = os.fstat(handle.fileno()).st_size
            try:
                data = memoryview(text.encode())
                while data:
                    data = data[handle.write(data):]
            except OSError:
                os.ftruncate(handle.fileno(), size)
                raise
    except OSError as err:
        raise write_error(path, err, f"{path.name} is as it was before this line") from None


def write_error(path: Path, err: BaseException, after: str) -> WriteError | None:
    """The one-line error of a failed write of `path`, looking through the chain of exceptions for
    the file system's own error; None when the failure did not come from the file system."""
    while err is not None and not (isinstance(err, OSError) and err.errno is not None):
        err = err.__cause__ or err.__context__
    if err is None:
        return None
    if err.errno in _NO_ROOM:
        free = f" ({_free_mb(path.parent)} MB free in {path.parent})" if err.errno == errno.ENOSPC else ""
        return DiskFullError(f"{path}: {_NO_ROOM[err.errno]}{free}; {after}")
    return WriteError(f"{path}: cannot write it ({err.strerror or err}); {after}")


def _free_mb(directory: Path) -> str:
    try:
        usage = os.statvfs(directory)
    except OSError:
        return "?"
    return f"{usage.f_bavail * usage.f_frsize / 2 ** 20:.1f}"


def check_file_path(path: str | Path, what: str) -> Path:
    """Refuse, before any work, an output file `path` that could not be written: a folder, a path
    under a file, a name too long, or a folder where no file can be created. `what` names the flag
    or key. Folders that do not exist yet are fine (the write creates them)."""
    path = Path(path)
    if str(path).strip() == "":
        raise ConfigError(f"{what} = {str(path)!r}: must name a file")
    if _is_dir(path, what):
        raise ConfigError(f"{what} = {path}: is a directory; give a file name")
    if _kind(path) == "stream":  # /dev/stdout, a pipe: written into, so it must be writable, not its folder
        if not os.access(path, os.W_OK):
            raise ConfigError(f"{what} = {path}: cannot write to it (permission denied)")
        return path
    _check_creatable(path, what)
    return path


def check_folder_path(path: str | Path, what: str) -> Path:
    """Refuse, before any work, an output folder `path` that is a file or where no file can be created."""
    path = Path(path)
    if str(path).strip() == "":
        raise ConfigError(f"{what} = {str(path)!r}: must name a folder (. for the current one)")
    if _exists(path, what) and not _is_dir(path, what):
        raise ConfigError(f"{what} = {path}: exists and is not a directory")
    _check_creatable(path / ".distmaml-probe", what, shown=path)
    return path


def _exists(path: Path, what: str) -> bool:
    try:
        os.stat(path)
        return True
    except FileNotFoundError:
        return False
    except NotADirectoryError:
        raise ConfigError(f"{what} = {path}: a part of it is a file, not a directory") from None
    except OSError as err:
        raise ConfigError(f"{what} = {path}: {err.strerror}") from None


def _is_dir(path: Path, what: str) -> bool:
    return _exists(path, what) and path.is_dir()


def _check_creatable(path: Path, what: str, shown: Path | None = None) -> None:
    """`path` (a file) could be created: the nearest existing folder above it accepts new files, and
    every name still to be created fits the file system."""
    shown = path if shown is None else shown
    folder, missing = path.parent, [path.name]
    while not _exists(folder, what):
        missing.append(folder.name)
        folder = folder.parent
    if not folder.is_dir():
        raise ConfigError(f"{what} = {shown}: {folder} is a file, not a directory")
    longest = max((name for name in missing if name), key=lambda name: len(name.encode()), default="")
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    if len(longest.encode()) > limit:
        raise ConfigError(f"{what} = {shown}: a name of {len(longest.encode())} bytes ({longest[:20]}...) is longer "
                          f"than the {limit} the file system allows")
    try:
        descriptor, probe = tempfile.mkstemp(prefix=".distmaml-probe-", dir=folder)
    except OSError as err:
        raise ConfigError(f"{what} = {shown}: cannot create files in {folder} ({err.strerror})") from None
    os.close(descriptor)
    os.unlink(probe)
