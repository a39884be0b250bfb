"""Bring your own: task families and models named in a config by import path.

    task.family: my_package.tasks:PolynomialTasks      # a module on the Python path, or
    model.kind: examples/polynomials.py:build_model     # a file, relative to the current directory

A built-in name (sine, omniglot, mlp, ...) maps to its own import path, so built-ins and user code
load the same way, and nothing branches on which family or model a run uses.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
from pathlib import Path
from typing import Any

from distmaml.errors import ConfigError, DistmamlError


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


def _import(module_name: str, spec: str, key: str):
    if module_name.endswith(".py"):
        file = Path(module_name)
        if not file.is_file():
            raise ConfigError(f"{key} = {spec!r}: no such file {file} (relative to {Path.cwd()})")
        name = f"distmaml_user_{abs(hash(str(file.resolve())))}"
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
