"""Omniglot on disk: read the two upstream archives (or their extracted folders) once, resize every
drawing to 28x28, and cache the whole set as one uint8 array so that later starts take milliseconds.

    data = load_omniglot("data/omniglot")          # OmniglotData: images [1623, 20, 28, 28] uint8
    data.images[i, d]                               # drawing d of character i, strokes = 255
    data.characters[i]                              # Character(split, alphabet, name)

Characters are ordered by (split, alphabet, character folder), background before evaluation; that
order is the character index everywhere else. Nothing is ever downloaded.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from distmaml.errors import DataError
from distmaml.tasks.array_cache import default_cache_dir, load_or_build  # noqa: F401 (default_cache_dir: API)
from distmaml.tasks.image_folder_data import to_array

SPLITS = ("images_background", "images_evaluation")
IMAGE_SIZE = 28
# Bump when the preprocessing or the cache's layout changes, so an old cache is never served for new code.
_FORMAT_VERSION = 2


class OmniglotDataError(DataError):
    """The data set is missing, incomplete or damaged; the message is one line for the user."""


class Character(NamedTuple):
    split: str  # images_background or images_evaluation
    alphabet: str
    name: str  # the character's folder, e.g. character07


@dataclass(frozen=True)
class OmniglotData:
    images: np.ndarray  # [characters, drawings, 28, 28] uint8, strokes 255 on a background of 0
    characters: list[Character]

    def split_indices(self, split: str) -> np.ndarray:
        """Indices of the characters of `split` (images_background or images_evaluation)."""
        return np.array([i for i, c in enumerate(self.characters) if c.split == split], dtype=np.int64)


def load_omniglot(root: str | Path, cache_dir: str | Path | None = None) -> OmniglotData:
    """All 1623 characters of Omniglot under `root`, from the cache when the sources are unchanged."""
    root = Path(root)
    sources = find_sources(root)

    def decode() -> tuple[np.ndarray, dict]:
        images, characters = _decode_all(root, sources)
        return images, {"characters": characters}

    images, index = load_or_build(cache_dir, f"omniglot{IMAGE_SIZE}-{_cache_key(sources)}", decode)
    characters = [Character(*c) for c in index["characters"]]
    if images.shape[0] != len(characters):
        raise OmniglotDataError(f"the Omniglot cache for {root} holds {images.shape[0]} characters but lists "
                                f"{len(characters)}; delete it to rebuild it")
    return OmniglotData(images, characters)


def find_sources(root: Path) -> dict[str, Path]:
    """For each split, its extracted folder `root/<split>` if present, else `root/<split>.zip`."""
    sources: dict[str, Path] = {}
    for split in SPLITS:
        folder, archive = root / split, root / f"{split}.zip"
        if folder.is_dir():
            sources[split] = folder
        elif archive.is_file():
            sources[split] = archive
    if len(sources) < len(SPLITS):
        found = ", ".join(str(p.name) for p in sources.values()) or "neither"
        where = "" if root.is_dir() else " (no such folder)"
        raise OmniglotDataError(
            f"data.root={root}{where}: expected images_background.zip and images_evaluation.zip (or their "
            f"extracted folders) - found {found}; get them from github.com/brendenlake/omniglot (python/)")
    return sources


def _cache_key(sources: dict[str, Path]) -> str:
    """A digest of everything the cached array depends on: the preprocessing and each source's
    files (size and modification time; every PNG's for a folder, the archive's for a zip)."""
    digest = hashlib.sha256(f"v{_FORMAT_VERSION} size{IMAGE_SIZE} lanczos inverted".encode())
    for split, path in sources.items():
        digest.update(f"|{split}:{path.resolve()}".encode())
        for name, stat in _stats(path):
            digest.update(f"|{name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]


def _stats(path: Path):
    if path.is_file():
        yield path.name, path.stat()
        return
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            full = os.path.join(dirpath, name)
            yield os.path.relpath(full, path), os.stat(full)


def _decode_all(root: Path, sources: dict[str, Path]) -> tuple[np.ndarray, list[Character]]:
    """Decode and resize every drawing, characters in (split, alphabet, character) order."""
    images: list[np.ndarray] = []
    characters: list[Character] = []
    for split, path in sources.items():
        for character, drawings in sorted(_list_drawings(split, path).items()):
            characters.append(character)
            images.append(np.stack([_to_array(read(), f"{path}: {'/'.join(character[1:])}/{name}")
                                    for name, read in sorted(drawings)]))
    counts = {len(drawings) for drawings in images}
    if len(counts) != 1:
        raise OmniglotDataError(f"data.root={root}: characters have different numbers of drawings "
                                f"({sorted(counts)}); expected the same number for every character")
    return np.stack(images), characters


def _list_drawings(split: str, path: Path) -> dict[Character, list]:
    """{character: [(file name, function returning the PNG bytes)]} for one split's zip or folder."""
    drawings: dict[Character, list] = {}

    def add(parts: list[str], read) -> None:
        # <alphabet>/<character>/<xxxx_yy>.png below the split's top folder.
        if len(parts) == 3 and parts[2].endswith(".png"):
            drawings.setdefault(Character(split, parts[0], parts[1]), []).append((parts[2], read))

    if path.is_dir():
        for file in path.glob("*/*/*.png"):
            add(list(file.relative_to(path).parts), file.read_bytes)
    else:
        try:
            archive = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as err:
            raise OmniglotDataError(f"{path}: not a readable zip archive ({err}); download it again") from None

        def read(name: str) -> bytes:
            try:
                return archive.read(name)
            except (zipfile.BadZipFile, zlib.error, OSError, EOFError) as err:
                raise OmniglotDataError(f"{path}: entry {name} is damaged ({err}); download the archive "
                                        "again") from None

        for name in archive.namelist():
            parts = name.split("/")
            if parts[0] != split:
                raise OmniglotDataError(f"{path}: entry {name!r} is not under {split}/ (the upstream layout)")
            add(parts[1:], lambda name=name: read(name))
    if not drawings:
        raise OmniglotDataError(f"{path}: no drawings found; expected {split}/<alphabet>/<character>/*.png")
    return drawings


def _to_array(png: bytes, where: str) -> np.ndarray:
    """One drawing as 28x28 uint8 with strokes 255 on 0.

    LANCZOS, as in the MAML reference code (cbfinn/maml, omniglot_resize), is Pillow's sharpest
    antialiasing filter: the 3.75x reduction turns thin 1-bit strokes into grey levels instead of
    dropping them, and keeps more stroke detail than BILINEAR. Inverting makes the background 0,
    so that zero padding in the convolutions looks like empty paper.
    """
    return to_array(png, IMAGE_SIZE, 1, True, where)[0]
