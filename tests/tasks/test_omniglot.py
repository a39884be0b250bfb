"""Omniglot: the loader and its cache, the episodes, Conv4 under the batched engine, the config checks."""

from __future__ import annotations

import io
import os
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from distmaml import meta
from distmaml.config import ConfigError, load_config
from distmaml.models import BatchStatNorm2d, Conv4, build_model
from distmaml.tasks import build_task_family
from distmaml.tasks import omniglot_data
from distmaml.tasks.omniglot import OmniglotTasks, accuracy, cross_entropy, paper_train_characters
from distmaml.tasks.omniglot_data import OmniglotData, OmniglotDataError, load_omniglot
from distmaml.rng import STREAM_EVAL, STREAM_TRAIN

REPO = Path(__file__).resolve().parents[2]
REAL_ROOT = Path(os.environ.get("DISTMAML_OMNIGLOT") or REPO.parent / "shared/data/omniglot")
HAVE_REAL = (REAL_ROOT / "images_background.zip").is_file() or (REAL_ROOT / "images_background").is_dir()

# A small Omniglot-shaped set: (split, {alphabet: characters}); every character has DRAWINGS drawings.
FAKE_LAYOUT = {"images_background": {"Alpha": 3, "Beta": 2}, "images_evaluation": {"Gamma": 4}}
DRAWINGS = 6


def _drawing(character: int, drawing: int) -> Image.Image:
    """A 105x105 1-bit drawing, black strokes on white, unique to (character, drawing)."""
    pixels = np.ones((105, 105), dtype=bool)
    row = 5 + 9 * character
    pixels[row:row + 6, 10:95] = False  # the character's bar
    pixels[10:95, 5 + 15 * drawing:9 + 15 * drawing] = False  # the drawing's bar
    return Image.fromarray(pixels)


def _write_fake(root: Path, as_zip: bool) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    character_id = 0
    for split, alphabets in FAKE_LAYOUT.items():
        entries = {}
        for alphabet, count in alphabets.items():
            for c in range(count):
                character_id += 1
                for d in range(DRAWINGS):
                    name = f"{split}/{alphabet}/character{c + 1:02d}/{character_id:04d}_{d + 1:02d}.png"
                    entries[name] = _drawing(character_id, d)
        if as_zip:
            with zipfile.ZipFile(root / f"{split}.zip", "w") as archive:
                for name, image in entries.items():
                    png = io.BytesIO()
                    image.save(png, format="PNG")
                    archive.writestr(name, png.getvalue())
        else:
            for name, image in entries.items():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                image.save(root / name)
    return root


@pytest.fixture(scope="session")
def real_cache(tmp_path_factory) -> Path:
    """A cache folder shared by the whole test session, so the real set is decoded at most once."""
    if not HAVE_REAL:
        pytest.skip(f"real Omniglot not found at {REAL_ROOT} (set DISTMAML_OMNIGLOT to its folder)")
    return tmp_path_factory.mktemp("omniglot_cache")


@pytest.fixture(scope="session")
def real_data(real_cache) -> OmniglotData:
    start = time.perf_counter()
    data = load_omniglot(REAL_ROOT, real_cache)
    print(f"decoding real Omniglot took {time.perf_counter() - start:.1f} s")
    return data


@pytest.mark.parametrize("as_zip", [True, False], ids=["zips", "folders"])
def test_loader_reads_layout_and_reuses_its_cache(tmp_path, monkeypatch, as_zip):
    root = _write_fake(tmp_path / "data", as_zip)
    cache = tmp_path / "cache"
    data = load_omniglot(root, cache)
    characters = sum(sum(a.values()) for a in FAKE_LAYOUT.values())
    assert data.images.shape == (characters, DRAWINGS, 28, 28) and data.images.dtype == np.uint8
    assert data.characters[0] == ("images_background", "Alpha", "character01")
    assert data.characters[-1] == ("images_evaluation", "Gamma", "character04")
    assert list(data.split_indices("images_evaluation")) == [5, 6, 7, 8]
    # Strokes are bright on a dark background after inversion; the character bar of character 1
    # (rows 14..19 of 105) lands around rows 4-5 of 28.
    assert data.images[0, 0, 4:6, 5:20].mean() > 150 and data.images[0, 0, 20:, 20:].max() < 100
    assert not np.array_equal(data.images[0, 0], data.images[0, 1])
    files = list(cache.iterdir())
    assert len(files) == 2 and not list(root.rglob("*.npy"))
    mtimes = {f: f.stat().st_mtime_ns for f in files}

    def no_decoding(png, where):
        raise AssertionError("decoded a PNG although the cache was valid")

    monkeypatch.setattr(omniglot_data, "_to_array", no_decoding)
    again = load_omniglot(root, cache)
    assert np.array_equal(again.images, data.images) and again.characters == data.characters
    assert {f: f.stat().st_mtime_ns for f in cache.iterdir()} == mtimes


def test_changed_data_is_not_served_from_a_stale_cache(tmp_path):
    root = _write_fake(tmp_path / "data", as_zip=False)
    cache = tmp_path / "cache"
    first = load_omniglot(root, cache)
    png = root / "images_evaluation/Gamma/character04/0009_01.png"
    Image.fromarray(np.zeros((105, 105), dtype=bool)).save(png)  # all strokes
    os.utime(png, ns=(png.stat().st_atime_ns, png.stat().st_mtime_ns + 10**9))
    second = load_omniglot(root, cache)
    assert second.images[-1, 0].min() == 255 and first.images[-1, 0].min() == 0
    assert np.array_equal(second.images[:-1], first.images[:-1])


def test_default_cache_is_the_user_cache(tmp_path, monkeypatch):
    root = _write_fake(tmp_path / "data", as_zip=True)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    load_omniglot(root)
    assert len(list((tmp_path / "xdg" / "distmaml").glob("omniglot28-*.npy"))) == 1


def test_missing_or_incomplete_root_is_one_clear_line(tmp_path):
    with pytest.raises(OmniglotDataError) as missing:
        load_omniglot(tmp_path / "nowhere", tmp_path / "cache")
    message = str(missing.value)
    assert "\n" not in message and f"data.root={tmp_path / 'nowhere'} (no such folder)" in message
    assert "expected images_background.zip and images_evaluation.zip" in message and "found neither" in message

    root = _write_fake(tmp_path / "half", as_zip=True)
    (root / "images_evaluation.zip").unlink()
    with pytest.raises(OmniglotDataError, match=r"- found images_background\.zip;"):
        load_omniglot(root, tmp_path / "cache")


def test_real_omniglot_loads_every_character(real_data):
    assert real_data.images.shape == (1623, 20, 28, 28)
    assert len(real_data.split_indices("images_background")) == 964
    assert len(real_data.split_indices("images_evaluation")) == 659
    assert len({c.alphabet for c in real_data.characters}) == 50
    # Every drawing has strokes (bright) and mostly background (dark).
    per_image = real_data.images.reshape(1623 * 20, -1)
    assert per_image.max(axis=1).min() > 128 and np.median(per_image.mean(axis=1)) < 64


@pytest.mark.slow
def test_real_omniglot_extracted_folders_match_the_zips(real_data, tmp_path):
    for split in ("images_background", "images_evaluation"):
        with zipfile.ZipFile(REAL_ROOT / f"{split}.zip") as archive:
            archive.extractall(tmp_path)
    from_folders = load_omniglot(tmp_path, tmp_path / "cache")
    assert from_folders.characters == real_data.characters
    assert np.array_equal(from_folders.images, real_data.images)


def _family(real_data, **kwargs) -> OmniglotTasks:
    return OmniglotTasks(real_data, **{"ways": 5, "support": 1, "query": 15, **kwargs})


def test_paper_split_is_1200_fixed_characters(real_data):
    train = paper_train_characters(1623)
    assert len(train) == 1200 and len(set(train.tolist())) == 1200
    assert torch.equal(train, paper_train_characters(1623))
    # Characters of both archives end up on both sides.
    assert 0 < int((train < 964).sum()) < 1200
    family = _family(real_data, seed=123)
    assert family.num_classes(STREAM_TRAIN) == 4800 and family.num_classes(STREAM_EVAL) == 423
    background = _family(real_data, split="background")
    assert background.num_classes(STREAM_TRAIN) == 964 and background.num_classes(STREAM_EVAL) == 659


def test_episodes_are_deterministic_and_shards_are_slices(real_data):
    family = _family(real_data, support=2, query=3)
    whole = family.sample(STREAM_TRAIN, 7, torch.arange(10))
    again = family.sample(STREAM_TRAIN, 7, torch.arange(10))
    shard = family.sample(STREAM_TRAIN, 7, torch.arange(4, 10))
    for full, same, part in zip(whole, again, shard):
        assert torch.equal(full, same) and torch.equal(full[4:], part)
    assert whole.support_x.shape == (10, 10, 1, 28, 28) and whole.query_x.shape == (10, 15, 1, 28, 28)
    assert whole.support_y.dtype == torch.int64 and whole.support_x.dtype == torch.float32
    assert 0 <= whole.support_x.min() and whole.support_x.max() == 1
    assert torch.equal(whole.support_y[0], torch.tensor([0, 0, 1, 1, 2, 2, 3, 3, 4, 4]))
    other_iteration = family.sample(STREAM_TRAIN, 8, torch.arange(10))
    other_seed = _family(real_data, support=2, query=3, seed=1).sample(STREAM_TRAIN, 7, torch.arange(10))
    assert not torch.equal(whole.support_x, other_iteration.support_x)
    assert not torch.equal(whole.support_x, other_seed.support_x)


def _drawings_of(family, stream, classes):
    """[n, N, drawings, 784] every drawing of each class of a task, turned as the class says."""
    characters, rotations = family.split_classes(stream)
    images = family.images[characters[classes // rotations]].reshape(*classes.shape, -1, 28, 28)
    turns = classes % rotations
    turned = torch.stack([torch.rot90(images, k, dims=(-2, -1)) for k in range(4)])
    return turned[turns, torch.arange(classes.shape[0])[:, None], torch.arange(classes.shape[1])].flatten(-2)


def test_classes_distinct_and_support_query_are_disjoint_drawings(real_data):
    family = _family(real_data, ways=20, support=5, query=15)
    batch = family.sample(STREAM_TRAIN, 0, torch.arange(16))
    classes = family.classes(STREAM_TRAIN, 0, torch.arange(16))
    assert all(len(set(task.tolist())) == 20 for task in classes)
    assert classes.min() >= 0 and classes.max() < 4800
    drawings = _drawings_of(family, STREAM_TRAIN, classes).double()  # [16, 20, 20, 784]
    support = (batch.support_x.reshape(16, 20, 5, 784) * 255).double()
    query = (batch.query_x.reshape(16, 20, 15, 784) * 255).double()
    # Which of its class's drawings each image is: all found, all different.
    which = torch.cdist(torch.cat([support, query], dim=2), drawings)  # [16, 20, 20 images, 20 drawings]
    distance, index = which.min(dim=-1)
    assert distance.max() < 1e-6
    assert all(len(set(row.tolist())) == 20 for row in index.reshape(-1, 20))


def test_labels_in_random_order_and_classes_rotated(real_data):
    family = _family(real_data)
    indices = torch.arange(64)
    classes = family.classes(STREAM_TRAIN, 0, indices)
    # Labels in random order: label 0 is not always the smallest class index; 3 in 4 classes turned.
    assert 0.05 < float((classes[:, 0] == classes.min(dim=1).values).float().mean()) < 0.5
    assert 0.6 < float((classes % 4 != 0).float().mean()) < 0.9
    batch = family.sample(STREAM_TRAIN, 0, indices, support=1, query=1)
    drawings = _drawings_of(family, STREAM_TRAIN, classes).double()
    support = (batch.support_x.reshape(64, 5, 1, 784) * 255).double()
    assert torch.cdist(support, drawings).min(dim=-1).values.max() < 1e-6
    # A changed K at test time keeps each task's classes, labels and query images.
    more_shots = family.sample(STREAM_TRAIN, 0, indices, support=5, query=1)
    assert torch.equal(more_shots.query_x, batch.query_x)
    assert torch.equal(more_shots.support_x[:, ::5], batch.support_x)
    # Test tasks draw from the 423 unturned test characters.
    test_classes = family.classes(STREAM_EVAL, 0, indices)
    assert test_classes.max() < 423
    test = family.sample(STREAM_EVAL, 0, indices, support=1, query=1)
    drawings = _drawings_of(family, STREAM_EVAL, test_classes).double()
    assert torch.cdist((test.query_x.reshape(64, 5, 1, 784) * 255).double(), drawings).min(-1).values.max() < 1e-6


def test_loss_and_accuracy():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]]])
    labels = torch.tensor([[0, 1, 1]])
    assert torch.allclose(accuracy(logits, labels), torch.tensor([2 / 3]))
    assert torch.isclose(cross_entropy(logits[0], labels[0]), torch.nn.functional.cross_entropy(logits[0], labels[0]))


def test_batch_stat_norm_is_batchnorm_without_running_stats():
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, 5, dtype=torch.float64)
    ours, theirs = BatchStatNorm2d(4).double(), torch.nn.BatchNorm2d(4, track_running_stats=False).double()
    with torch.no_grad():
        for module in (ours, theirs):
            module.weight.copy_(torch.linspace(0.5, 2, 4))
            module.bias.copy_(torch.linspace(-1, 1, 4))
    ours.eval(), theirs.eval()  # no running statistics: batch statistics in eval mode too
    assert torch.allclose(ours(x), theirs(x), atol=1e-12)


def _conv4_problem(real_data):
    """Conv4 at Omniglot's own geometry (28x28, four poolings down to 1x1) on two real 5-way episodes,
    as problem.name = maml builds it for this family (cross entropy, accuracy)."""
    family = _family(real_data, support=1, query=2, dtype=torch.float64)
    batch = family.sample(STREAM_TRAIN, 3, torch.arange(2))
    torch.manual_seed(0)
    model = Conv4(5, channels=4).double()
    params = {name: value.detach().clone().requires_grad_() for name, value in model.named_parameters()}
    return meta.MAML(model, cross_entropy, accuracy_fn=accuracy), params, batch


def _inner(steps, mode="second_order", truncate=1, **kwargs):
    settings = {"truncate": truncate} if "truncate" in meta.method_settings(mode) else {}
    return meta.Inner(meta.make_rule("sgd", 0.4), steps, meta.make_method(mode, **settings), **kwargs)


@pytest.mark.parametrize("mode,truncate", [("second_order", 1), ("first_order", 1), ("truncated", 1)])
def test_conv4_batched_engine_matches_per_task_loop(real_data, mode, truncate):
    """tests/meta/test_maml.py checks conv4 batched against the loop on random 12x12 inputs; this is
    the real data path: 28x28 drawings, sampled labels, Conv4's default geometry."""
    problem, params, batch = _conv4_problem(real_data)
    spec = _inner(2, mode, truncate)
    batched = meta.meta_gradient(problem, params, batch, spec)
    looped = meta.meta_gradient_loop(problem, params, batch, spec)
    grads, losses = looped.grad_sum, looped.task_losses
    assert torch.allclose(batched.task_losses, losses, rtol=1e-12, atol=0)
    for name, value in grads.items():
        error = (batched.grad_sum[name] - value).norm() / value.norm()
        assert error < 1e-10, (name, float(error))
    if mode == "second_order":
        first = meta.meta_gradient(problem, params, batch, _inner(2, "first_order"))
        assert (first.grad_sum["classifier.weight"] - grads["classifier.weight"]).norm() > 1e-6


def test_conv4_checkpointed_unroll_is_exact(real_data):
    """Recomputing inner steps through Conv4's batch-statistics norm and poolings on real drawings gives
    the stored-graph meta-gradient bit for bit (tests/meta/test_checkpointing.py checks ResNet12 on random
    inputs, not Conv4)."""
    problem, params, batch = _conv4_problem(real_data)
    stored = meta.meta_gradient(problem, params, batch, _inner(4))
    assert stored.grad_sum["features.0.weight"].abs().sum() > 0
    recomputed = meta.meta_gradient(problem, params, batch, _inner(4, checkpoint="every_step"))
    for name, value in stored.grad_sum.items():
        assert torch.equal(recomputed.grad_sum[name], value), name


def test_config_checks_and_builders(real_data, real_cache):
    omniglot = ["task.family=omniglot", "model.kind=conv4", f"data.root={REAL_ROOT}", f"data.cache_dir={real_cache}"]
    with pytest.raises(ConfigError, match=r"^task.support \+ task.query = 5 \+ 16: must be <= 20, the drawings"):
        build_task_family(load_config(None, [*omniglot, "task.support=5", "task.query=16"]), "cpu")
    with pytest.raises(ConfigError, match=r"^eval shots \+ query = 10 \+ 15: must be <= 20"):
        build_task_family(load_config(None, [*omniglot, "task.support=1", "task.query=15", "eval.shots=10"]), "cpu")
    with pytest.raises(ConfigError, match=r"task.ways = 1: must be >= 2"):
        load_config(None, [*omniglot, "task.ways=1"])
    config = load_config(REPO / "configs/omniglot_20w1s.yaml",
                         [f"data.root={REAL_ROOT}", f"data.cache_dir={real_cache}", "model.channels=4"])
    family = build_task_family(config, "cpu")
    model = build_model(config, family.input_shape, family.num_outputs)
    batch = family.sample(STREAM_TRAIN, 0, torch.arange(2))
    logits = torch.func.vmap(model)(batch.support_x)
    assert logits.shape == (2, 20, 20)
    # An MLP on flattened drawings fits the family as well: no pairing rules, only shapes.
    flat = build_model(load_config(None, [*omniglot, "model.kind=mlp", "task.ways=20"]), family.input_shape, 20)
    assert torch.func.vmap(flat)(batch.support_x).shape == (2, 20, 20)


@pytest.mark.parametrize("name", ["omniglot_5w1s", "omniglot_5w5s", "omniglot_20w1s", "omniglot_debug"])
def test_configs_load(name):
    config = load_config(REPO / f"configs/{name}.yaml")
    assert config.task.family == "omniglot" and config.model.kind == "conv4"


def test_a_truncated_or_corrupt_zip_is_one_line_naming_the_file(tmp_path):
    root = _write_fake(tmp_path / "data", as_zip=True)
    archive = root / "images_background.zip"
    whole = archive.read_bytes()
    archive.write_bytes(whole[:len(whole) // 2])  # a download cut short
    with pytest.raises(OmniglotDataError) as cut:
        load_omniglot(root, tmp_path / "cache")
    assert str(cut.value).startswith(f"{archive}: not a readable zip archive (") and "\n" not in str(cut.value)
    # A flipped byte inside one compressed drawing: the archive opens, that entry does not.
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_DEFLATED) as rewritten:
        with zipfile.ZipFile(io.BytesIO(whole)) as original:
            for name in original.namelist():
                rewritten.writestr(name, original.read(name))
    with zipfile.ZipFile(archive) as reread:
        entry = reread.infolist()[0]
    data = bytearray(archive.read_bytes())
    # Past the entry's 30-byte local header and its name: a byte of its compressed data.
    data[entry.header_offset + 30 + len(entry.filename) + entry.compress_size // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    with pytest.raises(OmniglotDataError) as damaged:
        load_omniglot(root, tmp_path / "cache")
    assert str(damaged.value).startswith(f"{archive}: ") and "download" in str(damaged.value)
    assert "\n" not in str(damaged.value)


def test_a_damaged_cache_is_detected_and_rebuilt(tmp_path, caplog):
    root = _write_fake(tmp_path / "data", as_zip=False)
    cache = tmp_path / "cache"
    first = load_omniglot(root, cache)
    (array_path,) = cache.glob("*.npy")
    raw = bytearray(array_path.read_bytes())
    raw[-5] ^= 0x01  # same size, one pixel changed: shape checks cannot see it
    array_path.write_bytes(bytes(raw))
    with caplog.at_level("WARNING"):
        again = load_omniglot(root, cache)
    assert np.array_equal(again.images, first.images)
    assert "damaged (its checksum does not match); rebuilding it" in caplog.text
    assert np.array_equal(np.load(array_path), first.images)  # the rebuilt cache is intact


def test_eval_of_a_run_whose_data_moved_and_plot_of_a_classification_run(tmp_path):
    from conftest import run_cli

    root = _write_fake(tmp_path / "data", as_zip=True)
    run = tmp_path / "run"
    run_cli(["train", "configs/omniglot_debug.yaml", f"run.dir={run}", f"data.root={root}", "data.split=background",
             f"data.cache_dir={tmp_path / 'cache'}", "train.iterations=2", "train.meta_batch=2", "eval.at_end=false",
             "task.ways=2", "task.query=2", "eval.query=2"])
    moved = tmp_path / "moved"
    root.rename(moved)
    proc = run_cli(["eval", str(run), "--tasks", "4"], check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"distmaml eval: error: data.root={root} (no such folder)")
    assert len(proc.stderr.strip().splitlines()) == 1
    proc = run_cli(["eval", str(run), "--tasks", "4", "--data-root", str(moved)])
    assert "4 fresh tasks, 1-shot" in proc.stdout
    proc = run_cli(["eval", str(run), "--shots", "3", "--query", "18", "--data-root", str(moved)], check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == "distmaml eval: error: eval shots + query = 3 + 18: must be <= 20, the drawings of " \
        "each Omniglot character"
    proc = run_cli(["eval", str(run), "--shots", "3", "--query", "4", "--data-root", str(moved)], check=False)
    assert proc.returncode == 2 and "its characters have 6 drawings, fewer than support + query = 7" in proc.stderr
    proc = run_cli(["plot", str(run), str(tmp_path / "fig.png"), "--data-root", str(moved)], check=False)
    assert proc.returncode == 2 and "distmaml plot draws one-dimensional regression tasks with their true curve " \
        "(the sine family), a learned activation function or distilled examples; this run is omniglot " \
        "classification" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1


def test_omniglot_follows_the_task_family_protocol(tmp_path):
    from distmaml.tasks import check_family

    data = load_omniglot(_write_fake(tmp_path / "data", as_zip=True), tmp_path / "cache")
    check_family(OmniglotTasks(data, split="background", ways=3, support=1, query=2, seed=5))
    with pytest.raises(ConfigError, match=r"^task.ways = 3: the Omniglot test split has only 0 classes$"):
        OmniglotTasks(data, split="paper", ways=3, query=2)  # 9 characters, all of them in the paper split's training part
