"""Few-shot image folders: the layouts, the cache, the episodes, and Omniglot read as class folders."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from distmaml.commands import cli
from distmaml.config import load_config
from distmaml.errors import ConfigError, DataError
from distmaml.rng import STREAM_EVAL, STREAM_TRAIN
from distmaml.tasks import build_task_family, check_family
from distmaml.tasks import image_folder_data
from distmaml.tasks.image_folder import ImageFolderTasks
from distmaml.tasks.image_folder_data import load_split
from conftest import REPO

# Classes per split and images per class (uneven on purpose).
LAYOUT = {"train": [7, 9, 8, 6, 10, 7], "val": [6, 6, 7, 6, 6], "test": [8, 6, 9, 7, 6, 6]}


def image(split: int, cls: int, index: int) -> Image.Image:
    """A flat image whose colour says which it is; sizes, formats and modes vary from image to image."""
    size = (30 + 7 * (index % 3), 24 + 5 * (cls % 4))
    if index % 4 == 3:  # some grey images among colour ones
        return Image.new("L", size, 40 + 20 * cls + index)
    return Image.new("RGB", size, (40 + 20 * cls, 10 + 10 * index, 50 * split))


def write_class_folders(root, layout=LAYOUT):
    for split_number, (split, counts) in enumerate(layout.items()):
        for cls, count in enumerate(counts):
            folder = root / split / f"class_{cls:02d}"
            folder.mkdir(parents=True)
            for index in range(count):
                suffix = ".jpg" if index % 2 else ".png"
                image(split_number, cls, index).save(folder / f"img_{index:03d}{suffix}", quality=100)
    return root


def write_csv_layout(root, layout=LAYOUT):
    (root / "images").mkdir(parents=True)
    for split_number, (split, counts) in enumerate(layout.items()):
        with open(root / f"{split}.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["filename", "label"])
            for cls, count in enumerate(counts):
                for index in range(count):
                    name = f"n{split_number}{cls:02d}{index:04d}" + (".jpg" if index % 2 else ".png")
                    image(split_number, cls, index).save(root / "images" / name, quality=100)
                    writer.writerow([name, f"n0{split_number}{cls:05d}"])
    return root


def identity(pixels: torch.Tensor) -> tuple[int, int]:
    """(class, index) of one gathered RGB image of the train split, from its colour."""
    red, green, blue = (round(float(pixels[channel].mean())) for channel in range(3))
    if red == green == blue:  # a grey image: 40 + 20 cls + index, index = 3 mod 4
        for index in range(3, 12, 4):
            if (red - 40 - index) % 20 == 0:
                return (red - 40 - index) // 20, index
    return round((red - 40) / 20), round((green - 10) / 10)  # JPEG may shift a flat colour by a level


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return write_class_folders(tmp_path_factory.mktemp("folders"))


def family(root, cache, **kwargs):
    settings = dict(image_size=20, channels=3, invert=False, cache_dir=cache)
    return ImageFolderTasks(load_split(root, "train", **settings), load_split(root, "test", **settings), **kwargs)


def test_class_folders_load_grouped_by_class_and_reuse_their_cache(folders, tmp_path, monkeypatch):
    data = load_split(folders, "train", image_size=20, channels=3, cache_dir=tmp_path)
    assert data.images.shape == (sum(LAYOUT["train"]), 3, 20, 20) and data.images.dtype == np.uint8
    assert data.class_names == [f"class_{c:02d}" for c in range(6)]
    assert data.class_count.tolist() == LAYOUT["train"]
    start = data.class_start[2]
    assert data.images[start + 2, 0, 10, 10] == 80 and data.images[start + 2, 1, 10, 10] == 30  # class 2, image 2 (PNG)
    assert data.images[start + 3, 0, 10, 10] == data.images[start + 3, 2, 10, 10] == 83  # grey: 40 + 40 + 3
    grey = load_split(folders, "train", image_size=16, channels=1, invert=True, cache_dir=tmp_path)
    assert grey.images.shape[1:] == (1, 16, 16)

    def no_decoding(*args):
        raise AssertionError("decoded an image although the cache was valid")

    monkeypatch.setattr(image_folder_data, "to_array", no_decoding)
    again = load_split(folders, "train", image_size=20, channels=3, cache_dir=tmp_path)
    assert np.array_equal(again.images, data.images) and again.class_names == data.class_names
    assert not list(folders.rglob("*.npy"))  # never written into the data folder


def test_the_mini_imagenet_csv_layout_gives_the_same_classes(folders, tmp_path):
    from_csv = load_split(write_csv_layout(tmp_path / "csv"), "train", image_size=20, cache_dir=tmp_path / "c1")
    from_folders = load_split(folders, "train", image_size=20, cache_dir=tmp_path / "c2")
    assert from_csv.class_count.tolist() == LAYOUT["train"]
    assert np.array_equal(from_csv.images, from_folders.images)


def test_a_damaged_cache_is_rebuilt(folders, tmp_path, caplog):
    first = load_split(folders, "val", image_size=12, cache_dir=tmp_path)
    (array_path,) = tmp_path.glob("*.npy")
    raw = bytearray(array_path.read_bytes())
    raw[-3] ^= 0x10
    array_path.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        again = load_split(folders, "val", image_size=12, cache_dir=tmp_path)
    assert np.array_equal(again.images, first.images) and "damaged (its checksum does not match); rebuilding it" in caplog.text


def test_a_cache_that_cannot_be_written_costs_a_warning_not_the_run(folders, tmp_path, caplog, disk_full_after):
    expected = load_split(folders, "val", image_size=12, cache_dir=tmp_path / "roomy")
    disk_full_after(100)
    with caplog.at_level("WARNING"):
        loaded = load_split(folders, "val", image_size=12, cache_dir=tmp_path / "full")
    assert np.array_equal(loaded.images, expected.images)
    assert "could not cache the decoded data in" in caplog.text and "no space left on device" in caplog.text
    assert list((tmp_path / "full").iterdir()) == []  # no half-written array, no index without its array


def test_episodes_are_deterministic_slices_with_distinct_classes_and_disjoint_sets(folders, tmp_path):
    tasks = family(folders, tmp_path, ways=3, support=2, query=3, seed=5)
    check_family(tasks)
    batch = tasks.sample(STREAM_TRAIN, 4, torch.arange(8))
    assert batch.support_x.shape == (8, 6, 3, 20, 20) and batch.query_x.shape == (8, 9, 3, 20, 20)
    assert batch.support_x.min() >= 0 and batch.support_x.max() <= 1
    assert batch.support_y[0].tolist() == [0, 0, 1, 1, 2, 2]
    for t in range(8):
        support = [identity(255 * batch.support_x[t, i]) for i in range(6)]
        query = [identity(255 * batch.query_x[t, i]) for i in range(9)]
        classes = [support[2 * label][0] for label in range(3)]
        assert len(set(classes)) == 3
        for i, (cls, index) in enumerate(support):
            assert cls == classes[i // 2] and 0 <= index < LAYOUT["train"][cls]
        for i, (cls, index) in enumerate(query):
            assert cls == classes[i // 3] and 0 <= index < LAYOUT["train"][cls]
        assert not set(support) & set(query)
    evaluation = tasks.sample(STREAM_EVAL, 0, torch.arange(8))
    assert not torch.equal(evaluation.support_x, batch.support_x)


def test_omniglot_written_as_class_folders_gives_the_omniglot_loaders_episodes(tmp_path):
    """The same characters read by the Omniglot loader and as image folders: the same pixels."""
    from test_omniglot import _write_fake

    from distmaml.tasks.omniglot import OmniglotTasks
    from distmaml.tasks.omniglot_data import load_omniglot

    source = _write_fake(tmp_path / "omniglot", as_zip=False)
    for split, folder in (("train", "images_background"), ("test", "images_evaluation")):
        for character in sorted((source / folder).glob("*/*")):
            target = tmp_path / "folders" / split / f"{character.parent.name}__{character.name}"
            target.mkdir(parents=True)
            for drawing in sorted(character.glob("*.png")):
                (target / drawing.name).write_bytes(drawing.read_bytes())
    omniglot = OmniglotTasks(load_omniglot(source, tmp_path / "c1"), split="background", ways=3, support=2, query=3,
                             seed=9)
    settings = dict(image_size=28, channels=1, invert=True, cache_dir=tmp_path / "c2")
    folders = ImageFolderTasks(load_split(tmp_path / "folders", "train", **settings),
                               load_split(tmp_path / "folders", "test", **settings), ways=3, support=2, query=3, seed=9)
    for stream in (STREAM_TRAIN, STREAM_EVAL):
        for iteration in (0, 17):
            a, b = omniglot.sample(stream, iteration, torch.arange(6)), folders.sample(stream, iteration, torch.arange(6))
            for x, y in zip(a, b):
                assert torch.equal(x, y)


def test_missing_splits_small_classes_and_broken_images_are_one_line(folders, tmp_path):
    with pytest.raises(DataError, match=r"no train/ class folders and no train.csv"):
        load_split(tmp_path / "nothing", "train", image_size=20)
    config = load_config(None, ["task.family=image_folder", "model.kind=conv4", f"data.root={folders}",
                                f"data.cache_dir={tmp_path}", "task.image_size=20", "task.support=4",
                                "task.query=4"])
    with pytest.raises(ConfigError, match=r"support \+ query = 8 examples per class, but class 'class_03' of the "
                                          r"train split has only 6 images"):
        build_task_family(config, "cpu")
    broken = write_class_folders(tmp_path / "broken", {"train": [6, 6], "test": [6, 6]})
    (broken / "train/class_01/img_002.png").write_bytes(b"not an image")
    with pytest.raises(DataError, match=r"img_002.png: not a readable image"):
        load_split(broken, "train", image_size=20, cache_dir=tmp_path / "c3")


def test_image_folder_training_end_to_end_learns_to_tell_the_classes_apart(folders, tmp_path, capsys):
    """`distmaml train` on class folders: 30 meta-iterations take 3-way 1-shot accuracy after 2 inner steps
    on the test split's classes from about chance (0.39 untrained) to above 0.8 (0.95), and the query loss
    below half the untrained start's."""
    def trained_for(iterations):
        run = tmp_path / f"run{iterations}"
        assert cli.main(["train", str(REPO / "configs/miniimagenet_5w1s.yaml"), f"data.root={folders}",
                         f"data.cache_dir={tmp_path}", f"run.dir={run}", "task.image_size=16", "task.ways=3",
                         "task.query=4", "model.channels=8",
                         f"train.iterations={iterations}", "train.meta_batch=2", "train.lr=0.01", "inner.lr=0.05",
                         "inner.steps=2", "eval.tasks=60", "eval.steps=2", "logging.progress=false",
                         "train.log_every=10"]) == 0
        table = capsys.readouterr().out
        assert "| steps | query loss (mean ± 95% CI)" in table and "accuracy" in table
        return json.loads((run / "summary.json").read_text())["eval"]["steps"][-1]

    untrained, trained = trained_for(0), trained_for(30)
    assert untrained["accuracy"] < 0.5 and trained["accuracy"] > 0.8, (untrained, trained)
    assert trained["loss"] < 0.5 * untrained["loss"], (untrained, trained)


def test_an_empty_class_folder_is_named_as_a_class_with_too_few_images_is(tmp_path):
    """It was dropped silently (the set had a class less than its folders), while a one-image class was refused."""
    root = write_class_folders(tmp_path / "data", {"train": [6, 6], "test": [6, 6]})
    (root / "train/class_09").mkdir()
    (root / "train/class_09/notes.txt").write_text("to do")
    with pytest.raises(DataError) as refused:
        load_split(root, "train", image_size=20, cache_dir=tmp_path / "cache")
    assert str(refused.value) == (f"data.root={root}: class folder {root / 'train/class_09'} holds no images (.png, "
                                  ".jpg, .jpeg, .bmp, .gif, .webp, .tif, .tiff); add its images or remove the folder")


def test_a_csv_listing_an_image_twice_or_no_image_is_one_line(tmp_path):
    root = write_csv_layout(tmp_path / "data", {"train": [6, 6], "test": [6, 6]})
    rows = (root / "train.csv").read_text().splitlines()
    image, label = rows[3].split(",")
    (root / "train.csv").write_text("\n".join([*rows, f"{image},n0099999"]) + "\n")
    with pytest.raises(DataError) as refused:
        load_split(root, "train", image_size=20, cache_dir=tmp_path / "cache")
    assert str(refused.value) == (f"{root / 'train.csv'}: line {len(rows) + 1} lists {image} under label 'n0099999', "
                                  f"line 4 already under {label!r}; each image is listed once, in one class")
    (root / "train.csv").write_text("filename,label\n")
    with pytest.raises(DataError) as refused:
        load_split(root, "train", image_size=20, cache_dir=tmp_path / "cache")
    assert str(refused.value) == f"{root / 'train.csv'}: lists no images (a header at most)"


def test_evaluation_classes_shared_with_training_are_refused(tmp_path):
    root = write_csv_layout(tmp_path / "data", {"train": [6, 6], "test": [6, 6]})
    (root / "test.csv").write_text((root / "train.csv").read_text())
    config = load_config(None, ["task.family=image_folder", "model.kind=conv4", f"data.root={root}",
                                f"data.cache_dir={tmp_path / 'cache'}", "task.image_size=20", "task.ways=2",
                                "task.support=1", "task.query=2"])
    with pytest.raises(ConfigError) as refused:
        build_task_family(config, "cpu")
    assert str(refused.value).startswith("data.eval_split = test: it shares 12 image(s), e.g. ")
    assert str(refused.value).endswith(f"with the train split of data.root={root}; evaluation must draw classes never "
                                       "trained on")


def test_a_folder_holding_only_the_evaluation_split_is_enough_to_evaluate(folders, tmp_path, capsys):
    import shutil

    from distmaml.commands.cli import main
    from distmaml.commands.train import train

    run = tmp_path / "run"
    train(load_config(REPO / "configs/miniimagenet_5w1s.yaml",
                      [f"data.root={folders}", f"data.cache_dir={tmp_path / 'cache'}", f"run.dir={run}",
                       "task.image_size=20", "task.ways=3", "task.query=2", "model.channels=4", "train.iterations=1",
                       "train.meta_batch=2", "eval.at_end=false", "inner.steps=1", "logging.progress=false",
                       "logging.sharpness=false"]))
    moved = tmp_path / "moved"
    shutil.copytree(folders / "test", moved / "test")
    capsys.readouterr()
    assert main(["eval", str(run), "--data-root", str(moved), "--tasks", "4", "--steps", "1"]) == 0
    assert "| steps | query loss (mean ± 95% CI)" in capsys.readouterr().out
    family = build_task_family(load_config(None, ["task.family=image_folder", f"data.root={moved}",
                                                  f"data.cache_dir={tmp_path / 'cache'}", "task.image_size=20",
                                                  "task.ways=3", "task.support=1", "task.query=2"]), "cpu")
    with pytest.raises(DataError, match=rf"^data.root={moved}: no train/ class folders and no train.csv"):
        family.sample(STREAM_TRAIN, 0, torch.arange(2))


def test_an_image_size_that_cannot_fit_is_refused_before_decoding(folders, tmp_path, monkeypatch):
    """task.image_size = 30000 once failed inside PIL without naming the setting."""
    from distmaml import machine_memory

    monkeypatch.setattr(machine_memory, "available_bytes", lambda device: (8 * 2 ** 30, "MemAvailable in /proc/meminfo"))
    with pytest.raises(ConfigError) as refused:
        load_split(folders, "train", image_size=30000, cache_dir=tmp_path)
    assert str(refused.value) == (f"task.image_size = 30000: the 47 images of {folders}/train take 118.18 GiB decoded "
                                  "at 30000x30000, more than the 8.00 GiB available (MemAvailable in /proc/meminfo)")
