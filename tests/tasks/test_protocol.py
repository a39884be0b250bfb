"""The TaskFamily protocol: built-in and user families satisfy it; what breaks it is named in one line."""

import dataclasses

import pytest
import torch

from distmaml.config import load_config
from distmaml.errors import ConfigError
from distmaml.tasks import FamilyError, build_task_family, check_family
from distmaml.tasks.sine import SineTasks
from examples.polynomials import PolynomialTasks
from conftest import REPO


def test_built_in_and_example_families_pass_the_check():
    check_family(SineTasks(seed=3))
    check_family(PolynomialTasks(seed=3, degree=2))


class RandomTasks(PolynomialTasks):
    """Draws from torch's generator: not a function of (seed, stream, iteration, index)."""

    def sample(self, stream, iteration, indices, support=None, query=None):
        batch = super().sample(stream, iteration, indices, support, query)
        return batch._replace(support_y=batch.support_y + torch.rand_like(batch.support_y))


class PositionalTasks(PolynomialTasks):
    """Keys its tasks by their position in the batch, not their global index: shards differ."""

    def sample(self, stream, iteration, indices, support=None, query=None):
        return super().sample(stream, iteration, torch.arange(len(indices)), support, query)


class OneStreamTasks(PolynomialTasks):
    def sample(self, stream, iteration, indices, support=None, query=None):
        return super().sample(0, iteration, indices, support, query)


@dataclasses.dataclass(frozen=True)
class NoSeedTasks:
    support: int = 1


@pytest.mark.parametrize("family, message", [
    (RandomTasks(), "RandomTasks: two calls of sample() with the same (stream, iteration, indices) gave different "
                    "tasks"),
    (PositionalTasks(), "PositionalTasks: tasks 3..5 sampled on their own differ from the same tasks sampled with "
                        "the others"),
    (OneStreamTasks(), "OneStreamTasks: the evaluation stream gives the training tasks"),
    (NoSeedTasks(), "NoSeedTasks lacks seed, query, is_classification, input_shape, num_outputs, from_config, "
                    "sample, loss, with_seed, to"),
])
def test_the_check_names_what_breaks_the_protocol(family, message):
    with pytest.raises(FamilyError) as broken:
        check_family(family)
    assert message in str(broken.value) and "\n" not in str(broken.value)


@pytest.mark.parametrize("family, expected", [
    ("examples.nowhere:Tasks", "task.family = 'examples.nowhere:Tasks': cannot import examples.nowhere (No module "
                               "named 'examples.nowhere')"),
    ("examples.polynomials:Missing", "task.family = 'examples.polynomials:Missing': examples.polynomials has no "
                                     "attribute 'Missing'"),
    ("examples.polynomials:ResidualMLP", "task.family = 'examples.polynomials:ResidualMLP': ResidualMLP lacks "
                                         "from_config, sample, loss, with_seed (see"),
    ("polynomials", "task.family = 'polynomials': not one of sine, omniglot, image_folder, logistic, mnist1d, digits "
                    "and not an import path 'package.module:Name' or 'path/to/file.py:Name'"),
    # A relative file path is read from the working directory once, as the config is loaded.
    ("examples/missing.py:Tasks", f"task.family = '{REPO}/examples/missing.py:Tasks': no such file "
                                  f"{REPO}/examples/missing.py"),
])
def test_import_paths_that_do_not_work_are_one_line(family, expected, monkeypatch):
    monkeypatch.chdir(REPO)
    config = load_config(REPO / "examples/polynomials.yaml", [f"task.family={family}"])
    with pytest.raises(ConfigError) as refused:
        build_task_family(config, "cpu")
    assert str(refused.value).startswith(expected), str(refused.value)


def test_a_file_path_and_args_from_the_config_reach_the_family():
    config = load_config(REPO / "examples/polynomials.yaml", ["task.family=examples/polynomials.py:PolynomialTasks",
                                                              "task.args.degree=1"])
    family = build_task_family(config, "cpu")
    assert family.degree == 1 and type(family).__name__ == "PolynomialTasks"
    with pytest.raises(FamilyError, match=r"from_config does not take these arguments .*'colour'"):
        build_task_family(load_config(REPO / "examples/polynomials.yaml", ["task.args.colour=red"]), "cpu")


def test_a_failure_inside_a_user_family_is_one_line_naming_where_not_blamed_on_the_arguments(tmp_path):
    source = tmp_path / "broken_family.py"
    source.write_text("from examples.polynomials import PolynomialTasks\n\n\n"
                      "class BrokenTasks(PolynomialTasks):\n"
                      "    @classmethod\n"
                      "    def from_config(cls, config, device, dtype=None, degree=3):\n"
                      "        return cls(seed=config.train.seed, support=None + 1)\n")
    config = load_config(REPO / "examples/polynomials.yaml", [f"task.family={source}:BrokenTasks"])
    with pytest.raises(FamilyError) as refused:
        build_task_family(config, "cpu")
    assert str(refused.value) == (f"task.family = '{source}:BrokenTasks': from_config failed: TypeError: unsupported "
                                  f"operand type(s) for +: 'NoneType' and 'int' ({source}:7)")
