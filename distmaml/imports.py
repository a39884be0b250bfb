"""Bring your own: task families, models, problems and methods named in a config by import path.

    task.family: my_package.tasks:PolynomialTasks      # a module on the Python path, or
    model.kind: examples/polynomials.py:build_model     # a file, relative to the current directory

A built-in name (sine, omniglot, mlp, ...) maps to its own import path, so built-ins and user code
load the same way, and nothing branches on which family or model a run uses.

A relative file path is read from the directory a run is started in, once: loading the config turns
it into an absolute path (`absolute_spec`), so that the run's config.yaml and checkpoints name the
file that was trained, and a resume or an evaluation started elsewhere runs that file, not another
of the same name. A run also records the content of the files it imported (`user_files`, a sha256
per file), so that code changed since a checkpoint was written is refused (`check_user_files`),
not run silently as if it were the code that trained it.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
import traceback
from pathlib import Path
from typing import Any

from distmaml.errors import ConfigError, DistmamlError

# The config keys that take an import path (and so may name a file of the user's).
SPEC_KEYS = ("problem.name", "task.family", "model.kind", "inner.mode")
# The override check_user_files names: a config key (run.user_code: same | any).
USER_CODE_OVERRIDE = "set run.user_code=any"

# The sha256 of each user file as it was when imported (absolute path -> hex digest): the code that ran.
_IMPORTED: dict[str, str] = {}


def resolve(spec: str, builtins: dict[str, str], key: str) -> Any:
    """The object `spec` names: a key of `builtins`, "package.module:Name" or "path/to/file.py:Name".

    Errors are one line naming the config key, the value and what went wrong.
    """
    path = builtins.get(spec, spec)
    module_name, sep, attribute = path.partition(":")
    if not sep or not module_name or not attribute:
        raise ConfigError(f"{key} = {spec!r}: not one of {', '.join(builtins)} and not an import path "
                          "'package.module:Name' or 'path/to/file.py:Name'")
    module = _import(module_name, spec, key)
    target: Any = module
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"{key} = {spec!r}: {module_name} has no attribute {attribute!r}")
        target = getattr(target, part)
    return target


def call_user(function, where: str, error: type[ConfigError] = ConfigError, /, *args, **kwargs) -> Any:
    """function(*args, **kwargs) for a function the config named, every failure one line.

    Arguments it does not take (task.args, model.args) are told apart from a TypeError raised inside
    it, and a failure inside names the file and line it came from. `where` begins the message.
    """
    try:
        inspect.signature(function).bind(*args, **kwargs)
    except TypeError as err:
        raise error(f"{where} does not take these arguments ({err})") from None
    except ValueError:  # no signature to check (a builtin): the call below says what is wrong
        pass
    try:
        return function(*args, **kwargs)
    except DistmamlError:
        raise
    except Exception as err:  # noqa: BLE001 - the user's code failed: one line, with where it failed
        frame = traceback.extract_tb(err.__traceback__)[-1]
        message = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
        raise error(f"{where} failed: {type(err).__name__}: {message} ({frame.filename}:{frame.lineno})") from None


def file_of(spec: Any) -> Path | None:
    """The file an import spec "path/to/file.py:Name" names (as written: relative or absolute), or
    None for a built-in name or a module path."""
    if not isinstance(spec, str):
        return None
    module_name, sep, attribute = spec.partition(":")
    return Path(module_name) if sep and attribute and module_name.endswith(".py") else None


def absolute_spec(spec: Any) -> Any:
    """`spec` with a relative file path made absolute against the current directory; anything else
    (a built-in name, a module path, an absolute path) as it is."""
    file = file_of(spec)
    if file is None or file.is_absolute():
        return spec
    return f"{os.path.abspath(file)}:{spec.partition(':')[2]}"


def absolute_specs(flat: dict[str, Any]) -> dict[str, Any]:
    """A flat config ({'problem.name': ...}) whose import specs name files by absolute path."""
    return {key: absolute_spec(value) if key in SPEC_KEYS else value for key, value in flat.items()}


def spec_values(config: Any) -> dict[str, Any]:
    """{key: its value} of the config's keys that take an import path (SPEC_KEYS)."""
    return {key: getattr(getattr(config, key.split(".")[0], None), key.split(".")[1], None) for key in SPEC_KEYS}


def user_files(config: Any) -> dict[str, str]:
    """{spec: sha256} of every file the config's import specs name (problem.name, task.family,
    model.kind, inner.mode): the content this process imported, or, for one not imported yet, the
    file's content now. What a checkpoint records, so that a later process can tell whether it would
    run the same code (check_user_files)."""
    found = {}
    for spec in spec_values(config).values():
        file = file_of(spec)
        if file is None:
            continue
        digest = _IMPORTED.get(str(file.resolve()))
        if digest is None and file.is_file():
            digest = _sha256(file)
        if digest is not None:
            found[spec] = digest
    return found


def check_user_files(recorded: dict[str, str], where: str, config: Any = None,
                     override: str = USER_CODE_OVERRIDE) -> None:
    """Raise ConfigError, in one line, if a file of `recorded` ({spec: sha256}, from user_files) is
    missing or holds other content than when `where` (a checkpoint) was written; call it before the
    files are imported. `config`, if given, names the key each spec is the value of; `override` is
    what lets the user run the code as it is now."""
    for spec, then in recorded.items():
        file = file_of(spec)
        if file is None:
            continue
        named = _named(spec, config)
        if not file.is_file():
            raise ConfigError(f"{named}: {file} no longer exists; {where} was written with it (sha256 {then[:12]}…): "
                              "restore it to use that checkpoint")
        now = _sha256(file)
        if now != then:
            raise ConfigError(f"{named}: {file} has changed since {where} was written (sha256 {then[:12]}… then, "
                              f"{now[:12]}… now); restore it, or {override} to run the code as it is now")


def _named(spec: str, config: Any) -> str:
    for key, value in (spec_values(config) if config is not None else {}).items():
        if value == spec:
            return f"{key} = {spec!r}"
    return repr(spec)


def _sha256(file: Path) -> str:
    return hashlib.sha256(file.read_bytes()).hexdigest()


def _import(module_name: str, spec: str, key: str):
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            # A config's relative path was made absolute against the directory the run started in.
            where = (f"relative to the current directory, {Path.cwd()}" if not file.is_absolute() else
                     "a relative path in a config is read from the directory the run was started in")
            raise ConfigError(f"{key} = {spec!r}: no such file {file} ({where})")
        # One module per content: a file changed since this process imported it is imported anew.
        digest = _sha256(file)
        name = f"distmaml_user_{abs(hash(str(file.resolve())))}_{digest[:16]}"
        _IMPORTED[str(file.resolve())] = digest
        if name in sys.modules:
            return sys.modules[name]
        loader_spec = importlib.util.spec_from_file_location(name, file)
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as err:  # noqa: BLE001 - the user's module failed while importing: say where
            del sys.modules[name]
            raise ConfigError(f"{key} = {spec!r}: importing {file} failed ({type(err).__name__}: {err})") from None
        return module
    # As `python -m` does, let a module under the current directory be found by the console script too.
    if str(Path.cwd()) not in sys.path and "" not in sys.path:
        sys.path.append(str(Path.cwd()))
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ConfigError(f"{key} = {spec!r}: cannot import {module_name} ({err}); is it installed, on "
                          "PYTHONPATH or under the current directory?") from None
    except Exception as err:  # noqa: BLE001 - the user's module failed while importing: say where
        raise ConfigError(f"{key} = {spec!r}: importing {module_name} failed ({type(err).__name__}: {err})") from None
