"""Methods and rules own their settings: the config schema agrees with their dataclasses, the command
line and the library build equal objects from the same values, unknown settings are refused in one
line, and every method answers at_steps (what a memory estimate probes)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from distmaml.build import build_inner, build_method
from distmaml.config import ConfigError, load_config
from distmaml.config.schema import Config
from distmaml.errors import SettingError
from distmaml.meta import (CG, MAML, METHODS, RULES, Implicit, Inner, MethodError, NeumannSeries, SecondOrder, Truncated,
                          make_method, make_rule, meta_gradient, method_settings, rule_settings)
from distmaml.meta.methods import batched_cg
from distmaml.models import MLP
from distmaml.rng import STREAM_TRAIN
from distmaml.tasks.sine import SineTasks

# A value other than the default for every config key a method or rule reads: a setting added
# without one here fails the tests below rather than going unchecked.
NON_DEFAULT = {"inner.truncate": 3, "implicit.damping": 0.25, "implicit.inner_safeguard": False,
               "implicit.cg_steps": 7, "implicit.cg_tol": 1e-6, "neumann.terms": 9, "neumann.alpha": 0.05,
               "finite_difference.eps": 0.003, "inner.lr": 0.2, "inner.steps": 6, "inner.schedule_blocks": 3,
               "inner.momentum": 0.7, "inner.betas": [0.8, 0.95], "inner.eps": 1e-6,
               "es.sigma": 0.2, "es.sigma_of": ["inner.lr=0.3"], "es.pairs": 3,
               "es.reuse_noise": True}
# Types written differently on the two sides: a config list holds what a rule keeps as a tuple, and
# inner.momentum has no default on either side (a momentum run must give it).
SAME_TYPE = {"tuple[float, float]": "list[float]", "tuple[str, ...]": "list[str]", "Optional[float]": "float | None"}


def _fields(component) -> dict[str, dataclasses.Field]:
    """A built component's settings (with its solver's, for the implicit method) as dataclass fields."""
    found = {field.name: field for field in dataclasses.fields(component) if field.name != "solve"}
    if isinstance(component, Implicit):
        found.update({field.name: field for field in dataclasses.fields(component.solve)})
    return found


def _schema_field(key: str) -> dataclasses.Field:
    section, name = key.split(".")
    section_type = {field.name: field.default_factory for field in dataclasses.fields(Config)}[section]
    return {field.name: field for field in dataclasses.fields(section_type)}[name]


def _components():
    for name in METHODS:
        yield name, make_method(name), method_settings(name)
    for name in RULES:  # momentum's coefficient has no default: given, as a momentum run must
        yield name, make_rule(name, **({"momentum": 0.9} if "momentum" in rule_settings(name) else {})), \
            rule_settings(name)


def _text(value) -> str:
    return f"{value:.6e}" if isinstance(value, float) else str(value).lower() if isinstance(value, bool) else \
        str(value).replace(" ", "")


@pytest.mark.parametrize("name, component, keys", list(_components()), ids=[n for n, *_ in _components()])
def test_every_setting_has_its_config_key_with_the_same_default_and_type(name, component, keys):
    fields = _fields(component)
    assert set(keys) == set(fields), f"{name}: every field is a setting with a key, and only those"
    for setting, key in keys.items():
        if key is None:  # set by the trainer: CG's stop_early follows engine.cuda_graph
            assert setting == "stop_early"
            continue
        own, schema = fields[setting], _schema_field(key)
        assert SAME_TYPE.get(schema.type, schema.type) == SAME_TYPE.get(own.type, own.type), (name, setting, key)
        schema_default = schema.default if schema.default is not dataclasses.MISSING else schema.default_factory()
        own_default = tuple(schema_default) if isinstance(own.default, tuple) else schema_default
        assert own.default == own_default, (name, setting, key)


def test_every_key_of_the_method_sections_belongs_to_a_method():
    owned = {key for name in METHODS for key in method_settings(name).values() if key}
    for section in ("implicit", "neumann", "finite_difference"):
        section_type = {field.name: field.default_factory for field in dataclasses.fields(Config)}[section]
        for field in dataclasses.fields(section_type):
            assert f"{section}.{field.name}" in owned


def test_the_library_defaults_are_the_command_line_s():
    """implicit.inner_safeguard once defaulted to true on the command line and false in the library."""
    for name in METHODS:
        assert build_method(load_config(None, [f"inner.mode={name}"])) == make_method(name)
    assert make_method("implicit").safeguard and make_method("neumann").safeguard


@pytest.mark.parametrize("name", METHODS)
def test_config_and_library_build_the_same_method_from_non_default_settings(name):
    keys = {setting: key for setting, key in method_settings(name).items() if key}
    config = load_config(None, [f"inner.mode={name}", "inner.steps=5", "engine.cuda_graph=true",
                                *(f"{key}={_text(NON_DEFAULT[key])}" for key in keys.values())])
    settings = {setting: NON_DEFAULT[key] for setting, key in keys.items()}
    if "stop_early" in method_settings(name):
        settings["stop_early"] = False  # a CUDA graph cannot look at CG's residual
    built, made = build_method(config), make_method(name, **settings)
    assert built == made
    if keys:
        assert made != make_method(name)


@pytest.mark.parametrize("name", RULES)
def test_config_and_library_build_the_same_rule_from_non_default_settings(name):
    keys = rule_settings(name)
    config = load_config(None, [f"inner.rule={name}", *(f"{key}={_text(NON_DEFAULT[key])}"
                                                        for key in {*keys.values(), "inner.steps", "inner.momentum"})])
    settings = {setting: tuple(NON_DEFAULT[key]) if isinstance(NON_DEFAULT[key], list) else NON_DEFAULT[key]
                for setting, key in keys.items()}
    built, made = build_inner(config).rule, make_rule(name, **settings)
    # Every setting at its default, the one without a default (momentum's coefficient) given.
    defaults = make_rule(name, **{setting: 0.9 for setting in settings if _fields(made)[setting].default is None})
    assert built == made and made != defaults


def test_a_rule_checks_its_settings_in_the_library_as_on_the_command_line():
    """inner.momentum once defaulted to 0.9 in the library and had to be given on the command line."""
    for overrides, build_rule in [
        (["inner.rule=momentum"], lambda: make_rule("momentum", 0.1)),
        (["inner.rule=momentum", "inner.momentum=1.0"], lambda: make_rule("momentum", 0.1, momentum=1.0)),
        (["inner.rule=adam", "inner.betas=[0.9]"], lambda: make_rule("adam", 0.1, betas=[0.9])),
        (["inner.rule=adam", "inner.eps=0"], lambda: make_rule("adam", 0.1, eps=0.0)),
        (["inner.rule=schedule", "inner.steps=2", "inner.schedule_blocks=3"],
         lambda: make_rule("schedule", 0.1, steps=2, blocks=3)),
    ]:
        with pytest.raises(SettingError) as library:
            build_rule()
        with pytest.raises(ConfigError) as command_line:
            build_inner(load_config(None, overrides))
        assert str(command_line.value).endswith(f": {library.value}"), (str(command_line.value), str(library.value))


def test_unknown_settings_are_refused_in_one_line_naming_the_valid_ones():
    with pytest.raises(MethodError) as caught:
        make_method("implicit", cg_step=3)
    assert str(caught.value) == ("implicit.cg_step = 3: is not a setting of the implicit method (its settings: "
                                 "damping, safeguard, cg_steps, cg_tol, stop_early)")
    with pytest.raises(MethodError) as caught:
        make_method("neumann", cg_steps=3)
    assert "(its settings: damping, safeguard, terms, alpha)" in str(caught.value)
    with pytest.raises(SettingError) as caught:
        make_rule("sgd", 0.1, momentum=0.9)
    assert str(caught.value) == "sgd.momentum = 0.9: is not a setting of the sgd rule (its settings: lr)"
    assert make_rule("lslr", 0.1, 4) == make_rule("lslr", lr=0.1, steps=4)  # the positional form still works
    assert make_rule("sgd", 0.1, 4) == make_rule("sgd", 0.1)  # steps reach only the rules that learn per step


@pytest.mark.parametrize("build, message", [
    (lambda: CG(cg_steps=0), "implicit.cg_steps = 0: must be >= 1"),
    (lambda: CG(cg_steps=2.5), "implicit.cg_steps = 2.5: must be an integer"),
    (lambda: CG(cg_tol=float("nan")), "implicit.cg_tol = nan: must be >= 0"),
    (lambda: NeumannSeries(alpha=0.0), "neumann.alpha = 0.0: must be > 0"),
    (lambda: NeumannSeries(terms=0), "neumann.terms = 0: must be >= 1"),
    (lambda: Implicit(damping=-1.0), "implicit.damping = -1.0: must be >= 0"),
    (lambda: make_method("finite_difference", eps=0.0), "finite_difference.eps = 0.0: must be > 0"),
    (lambda: Truncated(-1), "inner.truncate = -1: must be >= 0"),
])
def test_a_setting_out_of_range_is_refused_by_its_component_naming_its_key(build, message):
    with pytest.raises(MethodError) as caught:
        build()
    assert str(caught.value) == message


def test_the_implicit_method_takes_its_name_and_statistics_from_its_solver():
    cg, neumann = make_method("implicit"), make_method("neumann")
    assert cg == Implicit(CG()) and neumann == Implicit(NeumannSeries())
    assert (cg.name, cg.stat_names) == ("implicit", ("cg_residual", "cg_steps", "inner_grad_norm"))
    assert (neumann.name, neumann.stat_names) == ("neumann", ("neumann_residual", "neumann_growth", "inner_grad_norm"))


def _sine_problem():
    torch.manual_seed(0)
    model = MLP(1, [8], 1).double()
    tasks = SineTasks(seed=4, support=5, query=6, dtype=torch.float64).sample(STREAM_TRAIN, 0, torch.arange(3))
    return MAML(model, proximal=1.0), dict(model.named_parameters()), tasks


@dataclasses.dataclass(frozen=True)
class _LoggedCG:
    """A user's solver: CG run to convergence, under its own name and statistic."""

    name = "my_cg"
    stat_names = ("my_steps",)

    def __call__(self, matvec, rhs):
        solution, _, taken = batched_cg(matvec, rhs, 200, 0.0)
        return solution, {"my_steps": taken}


def test_a_solver_of_one_s_own_plugs_into_the_implicit_method():
    problem, phi, tasks = _sine_problem()
    rule = make_rule("sgd", 0.05)
    mine = meta_gradient(problem, phi, tasks, Inner(rule, 4, Implicit(_LoggedCG(), damping=0.1)))
    ours = meta_gradient(problem, phi, tasks, Inner(rule, 4, Implicit(CG(cg_steps=200, cg_tol=0.0), damping=0.1)))
    assert set(mine.stats) == {"my_steps", "inner_grad_norm"} and bool((mine.stats["my_steps"] > 0).all())
    for name in phi:
        torch.testing.assert_close(mine.grad_sum[name], ours.grad_sum[name], rtol=1e-10, atol=1e-12)


def test_at_steps_gives_the_method_as_it_runs_with_fewer_steps():
    assert Truncated(3).at_steps(2) == Truncated(2) and Truncated(1).at_steps(5) == Truncated(1)
    for name in METHODS:
        method = make_method(name, **({"truncate": 3} if "truncate" in method_settings(name) else {}))
        assert method.at_steps(2).name == method.name
        Inner(make_rule("sgd", 0.05), 2, method.at_steps(2))  # not refused at the step count probed
    # Truncated to at least every step is the exact gradient of the unrolled objective.
    problem, phi, tasks = _sine_problem()
    rule = make_rule("sgd", 0.05)
    probed = meta_gradient(problem, phi, tasks, Inner(rule, 2, Truncated(3).at_steps(2)))
    exact = meta_gradient(problem, phi, tasks, Inner(rule, 2, SecondOrder()))
    for name in phi:
        torch.testing.assert_close(probed.grad_sum[name], exact.grad_sum[name], rtol=1e-12, atol=1e-14)
