"""The built-in networks under the batched engine, and networks sized from their task family."""

import pytest
import torch

from distmaml.commands.train import train
from distmaml.config import load_config
from distmaml.errors import ConfigError
from distmaml.meta import MAML, Inner, TaskBatch, make_rule, meta_gradient, meta_gradient_loop
from distmaml.models import Conv4, ResNet12, build_model
from distmaml.tasks.omniglot import cross_entropy
from conftest import REPO


def image_tasks(tasks=2, ways=3, support=1, query=2, channels=3, size=16):
    generator = torch.Generator().manual_seed(0)

    def points(count):
        x = torch.rand(tasks, ways * count, channels, size, size, generator=generator, dtype=torch.float64)
        y = torch.arange(ways).repeat_interleave(count).expand(tasks, -1).contiguous()
        return x, y

    return TaskBatch(*points(support), *points(query))


def problem(model):
    torch.manual_seed(0)
    model = model.double()
    return MAML(model, cross_entropy), {name: value.detach().clone().requires_grad_()
                                        for name, value in model.named_parameters()}


@pytest.mark.parametrize("name, network", [("resnet12", lambda: ResNet12(3, (4, 6, 8, 8))),
                                           ("conv4 max-pool", lambda: Conv4(3, 4, in_channels=3, image_size=16,
                                                                            pool="max"))])
@pytest.mark.parametrize("mode", ["second_order", "first_order"])
def test_batched_engine_equals_the_per_task_loop(name, network, mode):
    """The sine MLP's case is tests/meta/test_maml.py's; here convolutions, pooling and batch statistics."""
    maml, params = problem(network())
    batch = image_tasks()
    spec = Inner(make_rule("sgd", 0.3), 2, mode)
    batched = meta_gradient(maml, params, batch, spec)
    looped = meta_gradient_loop(maml, params, batch, spec)
    for key, value in looped.grad_sum.items():
        error = (batched.grad_sum[key] - value).norm() / value.norm().clamp_min(1e-30)
        assert error < 1e-10, (key, float(error))
    assert looped.grad_sum["features.0.body.0.weight" if name == "resnet12" else "features.0.weight"].norm() > 0


def test_resnet12_has_the_standard_widths_and_maps_84_pixels_to_ways():
    model = ResNet12(5)
    assert [block.body[0].out_channels for block in model.features[:4]] == [64, 160, 320, 640]
    assert model(torch.zeros(2, 3, 84, 84)).shape == (2, 5)
    # Per stage: three 3x3 convolutions, a 1x1 projection, four normalisations (scale and shift).
    widths, expected = [3, 64, 160, 320, 640], 640 * 5 + 5
    for w_in, w_out in zip(widths, widths[1:]):
        expected += 9 * w_in * w_out + 2 * 9 * w_out * w_out + w_in * w_out + 4 * 2 * w_out
    assert sum(p.numel() for p in model.parameters()) == expected == 12_427_525


@pytest.mark.parametrize("overrides, shape, outputs, expected", [
    (["model.kind=conv4"], (1,), 1, "model.kind = conv4 takes square images (channels, height, width); the task "
                                    "family's inputs have shape (1,)"),
    (["model.kind=resnet12"], (3, 8, 8), 5, "model.kind = resnet12: 8x8 images are too small"),
    (["model.kind=examples.polynomials:build_model"], (3, 32, 32), 5, "model.kind = "
     "'examples.polynomials:build_model': its builder, for inputs of shape (3, 32, 32) and 5 outputs, failed: "
     "ValueError: too many values to unpack (expected 1) ("),
    (["model.kind=examples.polynomials:build_model", "model.args.colour=1"], (1,), 1,
     "model.kind = 'examples.polynomials:build_model': its builder, for inputs of shape (1,) and 1 outputs, does "
     "not take these arguments (got an unexpected keyword argument 'colour')"),
])
def test_a_model_that_does_not_fit_its_family_is_one_line(overrides, shape, outputs, expected):
    with pytest.raises(ConfigError) as refused:
        build_model(load_config(None, overrides), shape, outputs)
    assert str(refused.value).startswith(expected) and "\n" not in str(refused.value)


def test_any_built_in_model_fits_any_family_whose_shapes_it_takes():
    assert build_model(load_config(None, ["model.kind=mlp", "model.hidden=[8]"]), (1, 28, 28), 5)(
        torch.zeros(3, 1, 28, 28)).shape == (3, 5)
    assert build_model(load_config(None, ["model.kind=conv4", "model.pool=max", "model.channels=8"]), (3, 84, 84),
                       5)(torch.zeros(2, 3, 84, 84)).shape == (2, 5)


def test_the_example_family_and_model_learn_from_their_config(tmp_path):
    """examples/polynomials.yaml names its family and model by import path; 150 meta-iterations take the
    query loss after adaptation (5 steps, 50 fresh tasks) below 0.6 of the untrained start's (about 0.5)."""
    def trained_for(iterations):
        return train(load_config(REPO / "examples/polynomials.yaml", [
            f"run.dir={tmp_path / str(iterations)}", f"train.iterations={iterations}", "eval.tasks=50",
            "logging.progress=false"]))["eval"]["steps"][-1]["loss"]

    untrained, trained = trained_for(0), trained_for(150)
    assert trained < 0.6 * untrained, (untrained, trained)
