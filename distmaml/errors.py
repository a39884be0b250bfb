"""The errors a user can cause and fix: each is phrased as one line that names the file, key or value.

The CLI prints any of them as `distmaml <command>: error: <message>` and exits 2 (1 for a
TrainingError or a WriteError: the run itself failed); anything else reaching the top is a bug in
distmaml and keeps its traceback.
"""


class DistmamlError(Exception):
    """A problem with the user's input, data, files or machine, already phrased as one line."""


class ConfigError(DistmamlError, ValueError):
    """A configuration problem: an unknown key, a wrong type, an impossible value, a bad flag."""


class SettingError(ConfigError):
    """A setting a component (a hypergradient method, a problem) cannot work with: "key = value: reason".

    The library raises it as it is; the command line prefixes where the value came from."""

    def __init__(self, key: str, value, reason: str):
        super().__init__(f"{key} = {value!r}: {reason}")
        self.key, self.value, self.reason = key, value, reason


class CheckpointError(DistmamlError, RuntimeError):
    """A checkpoint or run directory that cannot be used. `damaged` is True when the file's content
    is broken (not when it could not be read right now, or was written by a newer distmaml)."""

    def __init__(self, message: str, damaged: bool = False):
        super().__init__(message)
        self.damaged = damaged


class DataError(DistmamlError, FileNotFoundError):
    """A data set that is missing, incomplete or damaged."""


class TrainingError(DistmamlError, RuntimeError):
    """Training that cannot go on: it diverged, or another rank failed."""


class WriteError(DistmamlError, OSError):
    """A file that could not be written where the work needed it (a read-only or forbidden folder, a
    full disk); nothing was overwritten. Places checked before the work are ConfigErrors instead."""


class DiskFullError(WriteError):
    """A file that could not be written because its disk, quota or the process's file-size limit is
    full; nothing was overwritten."""
