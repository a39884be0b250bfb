"""Few-shot image data sets on disk, in the layouts they are published in, decoded once and cached.

    root/train/<class>/*.jpg, root/val/..., root/test/...       class folders (tiered-ImageNet, CIFAR-FS)
    root/train.csv, root/val.csv, root/test.csv, root/images/   mini-ImageNet (Ravi and Larochelle):
                                                                 "filename,label" rows, the files in images/

Each split is decoded once (PIL: any format it reads, any size, grayscale or colour), resized to
a square (LANCZOS, as the Omniglot loader), and cached as one uint8 array [images, channels, size,
size] grouped by class (classes in name order, images in file-name order), written atomically
outside the data folder, keyed by the source files (names, sizes, modification times) and the
settings, and verified by a checksum when read back. Nothing is ever downloaded.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distmaml.errors import DataError
from distmaml.tasks.array_cache import load_or_build

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SplitData:
    images: np.ndarray  # [images, channels, size, size] uint8, grouped by class
    class_names: list[str]
    class_start: np.ndarray  # [classes] index of each class's first image
    class_count: np.ndarray  # [classes] images of each class


def list_split(root: Path, split: str) -> list[tuple[str, list[Path]]]:
    """[(class name, image files)] of one split, classes and files in name order."""
    folder, table = root / split, root / f"{split}.csv"
    if folder.is_dir():
        classes = []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if files:
                classes.append((class_dir.name, files))
        if not classes:
            raise DataError(f"data.root={root}: {folder} holds no class folders with images")
        return classes
    if table.is_file():
        members: dict[str, list[Path]] = {}
        with open(table, newline="") as handle:
            for number, row in enumerate(csv.reader(handle), 1):
                if number == 1 and [cell.strip().lower() for cell in row[:2]] == ["filename", "label"]:
                    continue
                if len(row) < 2:
                    raise DataError(f"{table}: line {number} is not 'filename,label'")
                members.setdefault(row[1].strip(), []).append(root / "images" / row[0].strip())
        missing = [str(path) for files in members.values() for path in files if not path.is_file()]
        if missing:
            raise DataError(f"{table}: {len(missing)} listed image(s) missing, e.g. {missing[0]}")
        return [(name, sorted(files)) for name, files in sorted(members.items())]
    where = "" if root.is_dir() else " (no such folder)"
    raise DataError(f"data.root={root}{where}: no {split}/ class folders and no {split}.csv; expected one of the "
                    "layouts in distmaml.tasks.image_folder_data")


def load_split(root: str | Path, split: str, image_size: int, channels: int = 3, invert: bool = False,
               cache_dir: str | Path | None = None) -> SplitData:
    """One split of the data set under `root`, from the cache when its sources are unchanged."""
    root = Path(root)
    classes = list_split(root, split)

    def decode() -> tuple[np.ndarray, dict]:
        files = [path for _, paths in classes for path in paths]
        log.info("decoding %d images of %s/%s to %dx%d (once; then cached)", len(files), root, split, image_size,
                 image_size)
        return _decode(files, image_size, channels, invert), {
            "class_names": [name for name, _ in classes], "class_count": [len(paths) for _, paths in classes]}

    key = _cache_key(root, split, classes, image_size, channels, invert)
    images, index = load_or_build(cache_dir, f"images-{split}-{image_size}-{key}", decode)
    counts = np.array(index["class_count"], dtype=np.int64)
    if images.shape[0] != counts.sum():
        raise DataError(f"the image cache for {root}/{split} holds {images.shape[0]} images but lists {counts.sum()}; "
                        "delete it to rebuild it")
    return SplitData(images, index["class_names"], np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)


def to_array(data: bytes, image_size: int, channels: int, invert: bool, where: str) -> np.ndarray:
    """One image as [channels, size, size] uint8: grey ("L") or RGB, LANCZOS-resized, optionally inverted."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            converted = image.convert("L" if channels == 1 else "RGB")
            pixels = np.asarray(converted.resize((image_size, image_size), resample=Image.LANCZOS), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{where}: not a readable image ({err})") from None
    pixels = 255 - pixels if invert else pixels
    return pixels[None] if channels == 1 else pixels.transpose(2, 0, 1)


def _decode_file(args: tuple[str, int, int, bool]) -> np.ndarray:
    path, image_size, channels, invert = args
    return to_array(Path(path).read_bytes(), image_size, channels, invert, path)


def _decode(files: list[Path], image_size: int, channels: int, invert: bool) -> np.ndarray:
    jobs = [(str(path), image_size, channels, invert) for path in files]
    workers = min(os.cpu_count() or 1, 8)
    if len(jobs) < 2000 or workers == 1:
        arrays = [_decode_file(job) for job in jobs]
    else:
        with ProcessPoolExecutor(workers) as pool:
            arrays = list(pool.map(_decode_file, jobs, chunksize=256))
    return np.stack(arrays)


def _cache_key(root: Path, split: str, classes, image_size: int, channels: int, invert: bool) -> str:
    digest = hashlib.sha256(f"v{_FORMAT_VERSION} {split} {image_size} {channels} {invert} lanczos "
                            f"{root.resolve()}".encode())
    for name, paths in classes:
        digest.update(f"|{name}".encode())
        for path in paths:
            stat = path.stat()
            digest.update(f"|{path.name}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()[:20]
