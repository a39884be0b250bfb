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

from distmaml.errors import ConfigError, DataError
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
    files: frozenset[str] = frozenset()  # the image files, resolved: splits must not share one
    labelled: bool = False  # class names are a CSV's labels (the same label in two splits is the same class)


class MissingSplit(DataError):
    """A split the data folder does not have at all (as opposed to one that is there but broken)."""


def list_split(root: Path, split: str) -> list[tuple[str, list[Path]]]:
    """[(class name, image files)] of one split, classes and files in name order.

    Every class folder must hold images (an empty one is named, as a class with too few images
    is, rather than dropped); a CSV must list images, each once.
    """
    folder, table = root / split, root / f"{split}.csv"
    if folder.is_dir():
        classes = []
        for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
            files = sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise DataError(f"data.root={root}: class folder {class_dir} holds no images "
                                f"({', '.join(IMAGE_SUFFIXES)}); add its images or remove the folder")
            classes.append((class_dir.name, files))
        if not classes:
            raise DataError(f"data.root={root}: {folder} holds no class folders with images")
        return classes
    if table.is_file():
        return _read_table(root, table)
    where = "" if root.is_dir() else " (no such folder)"
    raise MissingSplit(f"data.root={root}{where}: no {split}/ class folders and no {split}.csv; expected one of the "
                       "layouts in distmaml.tasks.image_folder_data")


def _read_table(root: Path, table: Path) -> list[tuple[str, list[Path]]]:
    """A mini-ImageNet CSV ("filename,label" rows, an optional header) as [(class name, image files)]."""
    members: dict[str, list[Path]] = {}
    first_seen: dict[str, tuple[int, str]] = {}
    with open(table, newline="") as handle:
        for number, row in enumerate(csv.reader(handle), 1):
            if number == 1 and [cell.strip().lower() for cell in row[:2]] == ["filename", "label"]:
                continue
            if not row:
                continue
            if len(row) < 2:
                raise DataError(f"{table}: line {number} is not 'filename,label'")
            name, label = row[0].strip(), row[1].strip()
            if name in first_seen:
                line, other = first_seen[name]
                raise DataError(f"{table}: line {number} lists {name} under label {label!r}, line {line} already "
                                f"under {other!r}; each image is listed once, in one class")
            first_seen[name] = (number, label)
            members.setdefault(label, []).append(root / "images" / name)
    if not members:
        raise DataError(f"{table}: lists no images (a header at most)")
    missing = [str(path) for files in members.values() for path in files if not path.is_file()]
    if missing:
        raise DataError(f"{table}: {len(missing)} listed image(s) missing, e.g. {missing[0]}")
    return [(name, sorted(files)) for name, files in sorted(members.items())]


def load_split(root: str | Path, split: str, image_size: int, channels: int = 3, invert: bool = False,
               cache_dir: str | Path | None = None) -> SplitData:
    """One split of the data set under `root`, from the cache when its sources are unchanged."""
    root = Path(root)
    classes = list_split(root, split)
    _check_decoded_size(root, split, sum(len(files) for _, files in classes), image_size, channels)

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
    files = frozenset(str(path.resolve()) for _, paths in classes for path in paths)
    return SplitData(images, index["class_names"], np.concatenate([[0], np.cumsum(counts)[:-1]]), counts, files,
                     labelled=not (root / split).is_dir())


def _check_decoded_size(root: Path, split: str, images: int, image_size: int, channels: int) -> None:
    """Refuse a split whose decoded array (uint8, images x channels x size x size) cannot fit in memory."""
    import torch

    from distmaml.machine_memory import available_bytes, describe_size

    needed = images * channels * image_size ** 2
    available, where = available_bytes(torch.device("cpu"))
    if needed > available:
        raise ConfigError(f"task.image_size = {image_size}: the {images} images of {root}/{split} take "
                          f"{describe_size(needed)} decoded at {image_size}x{image_size}, more than the "
                          f"{describe_size(available)} available ({where})")


def shared_classes(train: SplitData, evaluation: SplitData) -> list[str]:
    """What two splits share: image files, or (CSV labels) classes; [] when they are apart. Class
    folders of different splits may share a name (class_00) and still be different classes."""
    shared = sorted(train.files & evaluation.files)
    if shared:
        return [f"{len(shared)} image(s), e.g. {shared[0]}"]
    labels = sorted(set(train.class_names) & set(evaluation.class_names)) if train.labelled and evaluation.labelled \
        else []
    return [f"{len(labels)} label(s), e.g. {labels[0]!r}"] if labels else []


def to_array(data: bytes, image_size: int, channels: int, invert: bool, where: str) -> np.ndarray:
    """One image as [channels, size, size] uint8: grey ("L") or RGB, LANCZOS-resized, optionally inverted."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            converted = image.convert("L" if channels == 1 else "RGB")
            pixels = np.asarray(converted.resize((image_size, image_size), resample=Image.LANCZOS), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise DataError(f"{where}: not a readable image ({err})") from None
    except (MemoryError, Image.DecompressionBombError) as err:
        raise DataError(f"{where}: cannot decode it at {image_size}x{image_size} (task.image_size): "
                        f"{type(err).__name__} {err}") from None
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
