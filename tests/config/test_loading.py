import pytest

from distmaml.build import build_inner
from distmaml.config import ConfigError, describe, load_config, parse_override
from conftest import REPO


def errors_of(overrides, path=None):
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_every_shipped_config_loads():
    configs = sorted((REPO / "configs").glob("*.yaml"))
    assert len(configs) >= 4
    for path in configs:
        load_config(path)


def test_overrides_replace_file_values_with_types():
    config = load_config(REPO / "configs/sine_maml.yaml",
                         ["inner.steps=5", "model.hidden=[16, 8]", "train.lr=3e-4", "run.resume=false"])
    assert config.inner.steps == 5
    assert config.model.hidden == [16, 8]
    assert config.train.lr == pytest.approx(3e-4)
    assert config.run.resume is False
    assert config.train.meta_batch == 25  # from the file


def test_int_widens_to_float_but_not_the_other_way():
    assert load_config(None, ["inner.lr=1"]).inner.lr == 1.0
    assert errors_of(["inner.steps=1.5"]) == "command line: inner.steps = 1.5: expected int"


@pytest.mark.parametrize("override, expected", [
    (["inner.stepz=3"], "command line: unknown key 'inner.stepz' (did you mean 'inner.steps'?)"),
    (["inner.steps=-1"], "command line: inner.steps = -1: must be >= 0"),
    (["inner.steps=ten"], "command line: inner.steps = 'ten': expected int"),
    (["train.meta_batch=0"], "command line: train.meta_batch = 0: must be >= 1"),
    (["inner.lr=0"], "command line: inner.lr = 0.0: must be > 0"),
    (["inner.lr=-0.5"], "command line: inner.lr = -0.5: must be > 0"),
    (["train.lr_schedule=linear"], "command line: train.lr_schedule = 'linear': must be one of constant, cosine"),
    (["model.hidden=[40, 0]"], "command line: model.hidden = [40, 0]: every width must be >= 1"),
    (["task.amplitude=[5, 1]"], "command line: task.amplitude = [5.0, 1.0]: must be [low, high] with low <= high"),
    (["engine.device=tpu"], "command line: engine.device = 'tpu': must be auto, cpu, cuda or cuda:N"),
    (["inner"], "command line: 'inner' is not of the form key.sub=value"),
])
def test_bad_values_give_one_line_naming_key_value_and_source(override, expected):
    assert errors_of(override) == expected


def test_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("inner:\n  steps: -2\n")
    assert errors_of([], path) == f"{path}: inner.steps = -2: must be >= 0"
    path.write_text("inner:\n  stepz: 2\n")
    assert errors_of([], path) == f"{path}: unknown key 'inner.stepz' (did you mean 'inner.steps'?)"
    path.write_text("trian:\n  lr: 0.1\n")
    assert errors_of([], path) == f"{path}: unknown key 'trian.lr' (did you mean 'train.lr'?)"
    path.write_text("inner: [1, 2\n")
    assert errors_of([], path).startswith(f"{path}: line ")
    assert errors_of([], tmp_path / "missing.yaml") == f"{tmp_path / 'missing.yaml'}: config file not found"


def build_errors_of(overrides, path=None):
    """What distmaml.build.build_inner refuses of a config that loads: the checks of the method
    inner.mode names (it may be an import path, so they run when the run is built, not on loading)."""
    config = load_config(path, overrides)
    with pytest.raises(ConfigError) as info:
        build_inner(config)
    message = str(info.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("override, expected", [
    (["inner.mode=truncated", "inner.steps=2", "inner.truncate=3"],
     "command line: inner.truncate = 3: must be between 0 and inner.steps (2)"),
    (["inner.mode=second_ordr"],
     "command line: inner.mode = 'second_ordr': must be one of second_order, first_order, truncated, implicit, "
     "neumann, finite_difference, reptile, es, pes, or an import path"),
])
def test_bad_inner_settings_give_one_line_naming_key_value_and_source_when_built(override, expected):
    assert build_errors_of(override) == expected


def test_truncation_checked_against_the_file_that_set_steps(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text("inner:\n  mode: truncated\n  steps: 3\n  truncate: 2\n")
    assert build_inner(load_config(path)).method.truncate == 2
    assert build_errors_of(["inner.steps=1"], path) == \
        f"{path}: inner.truncate = 2: must be between 0 and inner.steps (1)"


def test_parse_override_reads_yaml_scalars():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a.b=true") == ("a.b", True)
    assert parse_override("a.b=runs/x=y") == ("a.b", "runs/x=y")


def test_every_field_is_documented():
    lines = describe().splitlines()
    assert len(lines) > 40
    assert all("  # " in line and not line.endswith("# ") for line in lines)


def float_keys():
    import dataclasses
    import typing

    from distmaml.config import Config

    keys = []
    for section in dataclasses.fields(Config):
        kind = typing.get_type_hints(Config)[section.name]
        for spec in dataclasses.fields(kind):
            hint = typing.get_type_hints(kind)[spec.name]
            if hint is float or float in typing.get_args(hint) or hint == list[float]:
                keys.append((f"{section.name}.{spec.name}", hint == list[float]))
    return keys


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_every_float_setting_refuses_nan_and_infinities(value):
    """Found by introspection, so a float key added later is covered too (a NaN cg_tol once trained nothing)."""
    keys = float_keys()
    assert {"implicit.cg_tol", "implicit.damping", "maml.proximal", "neumann.alpha", "finite_difference.eps",
            "train.grad_clip", "train.lr_min", "train.time_limit", "inner.lr", "task.amplitude"} <= {k for k, _ in keys}
    for key, is_list in keys:
        given = f"[0.1, {value}]" if is_list else value
        message = errors_of([f"{key}={given}"])
        assert message.startswith(f"command line: {key} = ") and message.endswith(": must be a finite number"), message


def test_config_files_that_cannot_be_read_are_one_line(tmp_path):
    assert errors_of([], tmp_path) == f"{tmp_path}: is a directory, not a config file"
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"run:\n  dir: \xff\xfe\n")
    assert errors_of([], binary) == f"{binary}: not a text file (byte 12 is not UTF-8)"
    empty = tmp_path / "empty.yaml"
    empty.write_text("# train:\n#   lr: 0.1\n")
    assert errors_of([], empty) == f"{empty}: the file holds no settings (empty, or only comments)"
    duplicate = tmp_path / "duplicate.yaml"
    duplicate.write_text("inner:\n  steps: 2\n  lr: 0.1\n  steps: 3\n")
    assert errors_of([], duplicate) == f"{duplicate}: line 4 not valid YAML (duplicate key 'steps' (first on line 2))"
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("train: 5\n")
    assert errors_of([], scalar) == f"{scalar}: section 'train' must be a mapping of keys, got 5"


def test_a_section_with_every_key_commented_out_is_an_empty_section(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inner:\n  steps: 4\ntrain:\n  # lr: 0.1\n  # iterations: 5\n")
    config = load_config(path)
    assert config.inner.steps == 4 and config.train.lr == 1e-3
