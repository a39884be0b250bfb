"""One decoded data set as one uint8 array on disk, reused while its sources are unchanged.

Both image loaders (Omniglot, image folders) decode once and cache here: the array and a small JSON
index beside it, named by a key the caller derives from its sources and settings, written
atomically (array first, index with the array's checksum last: a reader finds both or neither),
under the user's cache folder and never in the data folder, which may be read-only. A cached array
whose checksum no longer matches (same-size damage included) is rebuilt, with a warning: altered
pixels are never trained on silently.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from distmaml.files import atomic_write

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/distmaml, else ~/.cache/distmaml."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distmaml"


def load_or_build(cache_dir: str | Path | None, name: str,
                  build: Callable[[], tuple[np.ndarray, dict[str, Any]]]) -> tuple[np.ndarray, dict[str, Any]]:
    """(array, index) cached as <cache_dir>/<name>.npy and .json; build() makes them when missing or damaged."""
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    array_path, index_path = cache / f"{name}.npy", cache / f"{name}.json"
    if array_path.exists() and index_path.exists():
        cached = _read(array_path, index_path)
        if cached is not None:
            return cached
    array, index = build()
    try:
        atomic_write(array_path, lambda f: np.save(f, array))
        atomic_write(index_path, lambda f: f.write(json.dumps({**index, "sha256": checksum(array)}).encode()))
    except OSError as err:  # a full disk or a read-only cache folder costs the next run a decode, nothing more
        log.warning("could not cache the decoded data in %s (%s); going on without the cache", cache, err)
    return array, index


def checksum(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _read(array_path: Path, index_path: Path) -> tuple[np.ndarray, dict[str, Any]] | None:
    try:
        index = json.loads(index_path.read_text())
        array = np.load(array_path)
        intact = checksum(array) == index["sha256"]
    except (OSError, ValueError, KeyError, TypeError, EOFError):
        intact = False
    if not intact:
        log.warning("%s: the cached data is damaged (its checksum does not match); rebuilding it", array_path)
        return None
    return array, index
