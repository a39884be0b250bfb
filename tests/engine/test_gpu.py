"""CUDA-only checks of the graph-captured meta-iteration (run on a GPU machine: pytest -m gpu)."""

import pytest
import torch

from distmaml.commands.train import train
from distmaml.config import load_config
from distmaml.run.checkpoint import latest_checkpoint, load_checkpoint
from conftest import REPO

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def weights_after(tmp_path, name, *overrides):
    config = load_config(REPO / "configs/sine_debug.yaml",
                         [f"run.dir={tmp_path / name}", "engine.device=cuda", "eval.at_end=false",
                          "logging.progress=false", "train.checkpoint_every=0", *overrides])
    train(config)
    return load_checkpoint(latest_checkpoint(tmp_path / name / "checkpoints"))["model"]


def max_difference(a, b):
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


@pytest.mark.parametrize("mode", ["second_order", "first_order", "truncated", "implicit"])
def test_graph_and_eager_training_give_the_same_weights(tmp_path, mode):
    common = ["train.iterations=40", f"inner.mode={mode}", "inner.steps=3", "inner.truncate=2",
              "train.lr_schedule=cosine", "train.grad_clip=1.0"]
    eager = weights_after(tmp_path, "eager", *common)
    graph = weights_after(tmp_path, "graph", "engine.cuda_graph=true", *common)
    difference = max_difference(eager, graph)
    print(f"{mode}: max |eager - graph| = {difference:.3g}")
    assert difference <= 1e-6


def test_graph_resume_is_exact(tmp_path):
    common = ["engine.cuda_graph=true", "inner.steps=2"]
    straight = weights_after(tmp_path, "straight", "train.iterations=40", *common)
    weights_after(tmp_path, "split", "train.iterations=17", *common)
    resumed = weights_after(tmp_path, "split", "train.iterations=40", *common)
    difference = max_difference(straight, resumed)
    print(f"resume with graph: max difference {difference:.3g}")
    assert difference <= 1e-6


def test_graph_with_checkpointed_long_unroll(tmp_path):
    common = ["train.iterations=10", "inner.steps=12", "inner.checkpoint=auto"]
    eager = weights_after(tmp_path, "eager", *common)
    graph = weights_after(tmp_path, "graph", "engine.cuda_graph=true", *common)
    assert max_difference(eager, graph) <= 1e-6
