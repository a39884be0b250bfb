"""Typed configuration: dataclasses with a one-line doc per field, YAML files, dotted overrides.

    config = load_config("configs/sine_maml.yaml", ["inner.steps=5", "run.dir=runs/k5"])

Every problem (an unknown key, a wrong type, an impossible value) raises ConfigError with one line
that names the file (or "command line"), the key and the value. This module knows nothing of torch.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from distmaml.config_checks import check_values
from distmaml.errors import ConfigError  # re-exported: distmaml.config.ConfigError


def _opt(default: Any, doc: str, choices: tuple[str, ...] | None = None) -> Any:
    """A dataclass field with its one-line description (and allowed values, for strings)."""
    meta = {"doc": doc, "choices": choices}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class RunConfig:
    dir: str = _opt("runs/sine_maml", "run directory: config.yaml, metrics.jsonl, checkpoints/, summary.json")
    resume: bool | str = _opt(
        "auto", "auto: continue from the newest complete checkpoint in run.dir if any; true: must "
        "continue; false: start fresh; or the path of a checkpoint to continue from")


@dataclass
class TaskConfig:
    family: str = _opt("sine", "task family: sine, omniglot, image_folder, or your own as an import path "
                       "'package.module:Name' or 'path/to/file.py:Name' (see distmaml.tasks.TaskFamily)")
    args: dict = _opt({}, "keyword arguments for your own family's from_config (task.args.<name>=value)")
    support: int = _opt(10, "support examples per task (per class for classification): the K in K-shot")
    query: int = _opt(10, "query examples per task (per class for classification)")
    ways: int = _opt(5, "classes per task (classification only): the N in N-way")
    amplitude: list[float] = _opt([0.1, 5.0], "sine: amplitude range [low, high)")
    phase: list[float] = _opt([0.0, math.pi], "sine: phase range [low, high)")
    x_range: list[float] = _opt([-5.0, 5.0], "sine: input range [low, high)")
    image_size: int = _opt(84, "image_folder: images are resized to image_size x image_size")
    channels: int = _opt(3, "image_folder: 3 (RGB) or 1 (grey)")
    invert: bool = _opt(False, "image_folder: 255 - pixel (dark strokes on white paper become bright on 0)")


@dataclass
class ModelConfig:
    kind: str = _opt("mlp", "network: mlp, conv4, resnet12, or your own builder as an import path "
                     "'package.module:build' called as build(input_shape=..., num_outputs=..., **model.args)")
    args: dict = _opt({}, "keyword arguments for your own model builder (model.args.<name>=value)")
    hidden: list[int] = _opt([40, 40], "mlp: hidden layer widths")
    channels: int = _opt(64, "conv4: filters per convolution")
    pool: str = _opt("stride", "conv4: halve the resolution with stride-2 convolutions (the MAML paper's "
                     "Omniglot network) or 2x2 max-pooling (its mini-ImageNet network)", ("stride", "max"))
    widths: list[int] = _opt([64, 160, 320, 640], "resnet12: channels of its four residual stages")
    init: str = _opt("pytorch", "initial weights: PyTorch's layer defaults, or the MAML reference code's "
                     "truncated normal (std model.init_std, cut at 2 std) for weights with zero biases",
                     ("pytorch", "truncated_normal"))
    init_std: float = _opt(0.01, "model.init=truncated_normal: standard deviation of the weights")


@dataclass
class InnerConfig:
    steps: int = _opt(1, "inner steps per task during meta-training (K)")
    lr: float = _opt(0.01, "inner step size (alpha); the initial value of learned step sizes (meta_sgd, lslr)")
    rule: str = _opt("sgd", "inner update: plain SGD, a learned step size per weight (Meta-SGD) or per tensor and "
                     "step (MAML++'s LSLR), heavy-ball momentum, or Adam; all differentiable",
                     ("sgd", "meta_sgd", "lslr", "momentum", "adam"))
    momentum: Optional[float] = _opt(None, "inner.rule=momentum: heavy-ball coefficient in [0, 1), e.g. 0.9")
    betas: list[float] = _opt([0.9, 0.999], "inner.rule=adam: decay rates of Adam's two moments, each in [0, 1)")
    eps: float = _opt(1e-8, "inner.rule=adam: added to the root of the second moment")
    adapt: list[str] = _opt([], "name prefixes of the weights the inner loop adapts (ANIL: the head); [] adapts all")
    mode: str = _opt("second_order", "meta-gradient: through all steps, none, the last `truncate`, implicit (iMAML), "
                     "or reptile (theta - phi_K)", ("second_order", "first_order", "truncated", "implicit", "reptile"))
    truncate: int = _opt(1, "truncated mode: backpropagate through the last T inner steps only")
    checkpoint: str = _opt("none", "recompute inner steps in the backward pass instead of storing them",
                           ("none", "every_step", "segments", "auto"))
    checkpoint_segment: Optional[int] = _opt(None, "checkpoint=segments: inner steps per recomputed segment")
    multi_step_loss: bool = _opt(False, "MAML++'s multi-step loss: the meta-objective weights the query loss after "
                                 "every inner step, annealed towards the last over inner.multi_step_anneal iterations")
    multi_step_anneal: int = _opt(10000, "inner.multi_step_loss: iterations until the earlier steps' weights reach "
                                  "their floor (0.03 / K); 0 keeps every step's weight 1 / K")
    first_order_iterations: int = _opt(0, "derivative-order annealing (MAML++): first-order meta-gradients for this "
                                       "many iterations, then inner.mode")


@dataclass
class ImplicitConfig:
    lam: float = _opt(1.0, "implicit mode: strength of the pull of the task solution towards theta (lambda)")
    cg_steps: int = _opt(5, "implicit mode: conjugate-gradient iterations per task")
    cg_damping: float = _opt(0.0, "implicit mode: added to the diagonal of I + H/lambda for stability")
    cg_tol: float = _opt(1e-10, "implicit mode: stop CG once the squared residual falls below this")
    inner_safeguard: bool = _opt(True, "implicit mode: cap each inner step at the exact line minimiser of the "
                                 "local quadratic model (one Hessian-vector product), so a sharp task cannot "
                                 "diverge; the inner problem's solution is unchanged")


@dataclass
class TrainConfig:
    iterations: int = _opt(70000, "meta-iterations (outer Adam steps)")
    meta_batch: int = _opt(25, "tasks per meta-iteration, over all processes")
    lr: float = _opt(1e-3, "outer Adam learning rate (beta)")
    lr_schedule: str = _opt("constant", "outer learning-rate schedule", ("constant", "cosine"))
    lr_min: float = _opt(0.0, "cosine schedule: learning rate at the last iteration")
    grad_clip: float = _opt(0.0, "clip the meta-gradient to this global L2 norm (0: off)")
    seed: int = _opt(0, "seed of the weights and of every task")
    log_every: int = _opt(100, "iterations between metrics.jsonl lines")
    checkpoint_every: int = _opt(1000, "iterations between checkpoints (0: only at the end)")
    keep_checkpoints: int = _opt(3, "newest checkpoints kept in run.dir/checkpoints")
    check_every: int = _opt(0, "iterations between cross-process weight checksums (0: off)")
    time_limit: float = _opt(0.0, "stop cleanly (checkpoint, evaluate) after this many seconds of training (0: off)")
    max_meta_loss: float = _opt(0.0, "stop as diverged once the meta-batch's mean query loss after adaptation "
                                "exceeds this (0: only a non-finite loss or gradient stops the run)")


@dataclass
class EvalConfig:
    tasks: int = _opt(600, "fresh tasks to evaluate on")
    steps: int = _opt(10, "inner steps at test time; losses are reported after 0..steps")
    shots: Optional[int] = _opt(None, "support examples at test time (default: task.support)")
    query: Optional[int] = _opt(None, "query examples at test time (default: task.query)")
    at_end: bool = _opt(True, "evaluate on fresh tasks when training ends and write it to summary.json")
    seed: int = _opt(0, "seed of the evaluation tasks: the same for every train.seed, so runs are compared "
                     "on the same tasks")
    diverged_factor: float = _opt(10.0, "a task counts as diverged once its query loss is non-finite or above "
                                  "this many times its loss before adaptation (or the median task's, if larger)")


@dataclass
class EngineConfig:
    device: str = _opt("auto", "auto: cuda:LOCAL_RANK when CUDA is present, else cpu; or cpu, cuda")
    dtype: str = _opt("float32", "weights and data: float32, float64, or bf16 (float32 weights and Adam, "
                      "bfloat16 autocast of the model's matmuls and convolutions)", ("float32", "float64", "bf16"))
    batched: bool = _opt(True, "evaluate a process's tasks together with vmap (false: the per-task loop)")
    cuda_graph: bool = _opt(False, "capture the whole meta-iteration as one CUDA graph (CUDA only)")
    memory_check: bool = _opt(True, "before the first iteration, estimate its peak memory and refuse a run that "
                              "would not fit (with what would)")
    memory_budget: float = _opt(0.0, "GiB one process may use for the memory check (0: the memory available: "
                                "free device memory, or the machine's or job's available RAM)")
    threads: int = _opt(1, "CPU threads of this process (0: PyTorch's default, one per core); bitwise-equal "
                        "results need the same thread count and torch build")


@dataclass
class DistConfig:
    timeout: float = _opt(600.0, "seconds a collective waits for the other processes before the run fails "
                          "(rank 0 says so after a minute without progress)")


@dataclass
class LoggingConfig:
    progress: bool = _opt(True, "live progress bar on a terminal")
    sharpness: bool = _opt(True, "at each log step, the top Hessian eigenvalue of the support loss at theta "
                           "(mean over the meta-batch; inner SGD steps are unstable above 2 / inner.lr)")
    wandb: bool = _opt(False, "also log metrics to Weights & Biases (main process only)")
    wandb_project: str = _opt("distmaml", "wandb project")
    wandb_name: Optional[str] = _opt(None, "wandb run name (default: the run directory's name)")
    wandb_mode: str = _opt("auto", "auto: online with an API key, else offline",
                           ("auto", "online", "offline", "disabled"))
    wandb_timeout: float = _opt(30.0, "seconds wandb may take to reach its server; past that the run logs offline")


@dataclass
class DataConfig:
    root: str = _opt("data/omniglot", "folder with the data set (Omniglot: the two zips or their folders; "
                     "image_folder: train/val/test class folders or mini-ImageNet's csv files and images/)")
    cache_dir: Optional[str] = _opt(None, "where the preprocessed array is cached (default: user cache)")
    split: str = _opt("paper", "omniglot class split: paper (1200 train characters + rotations) or background",
                      ("paper", "background"))
    eval_split: str = _opt("test", "image_folder: the split evaluation draws its classes from", ("test", "val"))
    storage: str = _opt("auto", "image_folder: keep the images on the training device, in pinned host memory "
                        "(copied per episode), or auto: the device unless they take over half its free memory",
                        ("auto", "device", "host"))


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    inner: InnerConfig = field(default_factory=InnerConfig)
    implicit: ImplicitConfig = field(default_factory=ImplicitConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    data: DataConfig = field(default_factory=DataConfig)


# ---------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults, then the YAML file, then `key.sub=value` overrides; validated."""
    raw: dict[str, Any] = {}
    sources: dict[str, str] = {}
    if path is not None:
        path = Path(path)
        for key, value in _flatten(_read_sections(path)):
            raw[key] = value
            sources[key] = str(path)
    for item in overrides or []:
        key, value = parse_override(item)
        raw[key] = value
        sources[key] = "command line"
    return from_flat(raw, sources)


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping (PyYAML keeps the last silently)."""


def _unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    first_line: dict[Any, int] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        if key in first_line:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r} (first on line {first_line[key]})", key_node.start_mark)
        first_line[key] = key_node.start_mark.line + 1
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _read_sections(path: Path) -> dict[str, Any]:
    """The file's {section: {key: value}}, or a one-line ConfigError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a config file") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not a text file (byte {err.start} is not UTF-8)") from None
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file ({err.strerror})") from None
    try:
        loaded = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}:{where} not valid YAML ({getattr(err, 'problem', err)})") from None
    if loaded is None:
        # Running every default (70,000 iterations into runs/sine_maml) is never what an empty file meant.
        raise ConfigError(f"{path}: the file holds no settings (empty, or only comments)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(loaded).__name__}")
    sections = {spec.name for spec in dataclasses.fields(Config)}
    for name, value in list(loaded.items()):
        if name in sections and value is None:  # every key of the section commented out
            del loaded[name]
        elif name in sections and not isinstance(value, dict):
            raise ConfigError(f"{path}: section '{name}' must be a mapping of keys, got {value!r}")
    return loaded


def parse_override(item: str) -> tuple[str, Any]:
    """'inner.steps=5' -> ('inner.steps', 5); values are read as YAML scalars or lists."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"command line: {item!r} is not of the form key.sub=value")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def from_flat(raw: dict[str, Any], sources: dict[str, str] | None = None) -> Config:
    """Build a validated Config from {'section.key': value}; missing keys keep their defaults."""
    sources = sources or {}
    config = Config()
    known = {f"{section.name}.{spec.name}": (section.name, spec) for section in dataclasses.fields(Config)
             for spec in dataclasses.fields(_section_type(section.name))}
    nested: dict[str, dict[str, Any]] = {}
    for key, value in raw.items():
        where = sources.get(key, "config")
        parent = key.rsplit(".", 1)[0]
        if key not in known and parent in known and _field_type(*parent.split(".")) is dict:
            # task.args.degree: one entry of a free-form section, passed to user code as is
            nested.setdefault(parent, {})[key.rsplit(".", 1)[1]] = value
            continue
        if key not in known:
            hint = difflib.get_close_matches(key, known, n=1)
            suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
            raise ConfigError(f"{where}: unknown key '{key}'{suggestion}")
        section, spec = known[key]
        value = _coerce(value, _field_type(section, spec.name), key, where)
        choices = spec.metadata.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where}: {key} = {value!r}: must be one of {', '.join(choices)}")
        setattr(getattr(config, section), spec.name, value)
    for key, entries in nested.items():
        section, name = key.split(".")
        setattr(getattr(config, section), name, {**getattr(getattr(config, section), name), **entries})
    check_values(config, lambda key: sources.get(key, "default"))
    return config


def to_dict(config: Config) -> dict[str, dict[str, Any]]:
    """Plain nested data, for config.yaml, checkpoints and wandb."""
    return dataclasses.asdict(config)


def from_dict(tree: dict[str, Any], source: str, changes: dict[str, tuple[Any, str]] | None = None) -> Config:
    """Build a validated Config from nested data (a checkpoint's config); errors name `source`, or
    for a key in `changes` ({"eval.shots": (5, "--shots")}) the value and source given there."""
    raw = dict(_flatten(tree))
    sources = {key: source for key in raw}
    for key, (value, where) in (changes or {}).items():
        raw[key], sources[key] = value, where
    return from_flat(raw, sources)


def flatten(config: Config) -> dict[str, Any]:
    """{'section.key': value} for every field (a dict-valued field, like task.args, as one value)."""
    return {f"{section}.{name}": value for section, fields in to_dict(config).items() for name, value in fields.items()}


def describe() -> str:
    """Every key with its default and its description, one per line (for `--help-config`)."""
    lines = []
    for section in dataclasses.fields(Config):
        for spec in dataclasses.fields(_section_type(section.name)):
            default = getattr(getattr(Config(), section.name), spec.name)
            choices = spec.metadata.get("choices")
            allowed = f" [{'|'.join(choices)}]" if choices else ""
            lines.append(f"{section.name}.{spec.name} = {default!r}{allowed}  # {spec.metadata['doc']}")
    return "\n".join(lines)


def _flatten(tree: dict, prefix: str = ""):
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            yield from _flatten(value, name + ".")
        elif not isinstance(value, dict) or prefix:  # an empty section is no setting; an empty args dict is one
            yield name, value


def _section_type(name: str) -> type:
    return typing.get_type_hints(Config)[name]


def _field_type(section: str, name: str) -> Any:
    return typing.get_type_hints(_section_type(section))[name]


_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _coerce(value: Any, kind: Any, key: str, where: str) -> Any:
    """Check `value` against the annotation `kind`; ints widen to float, nothing else converts."""
    origin = typing.get_origin(kind)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(kind):
            try:
                return _coerce(value, option, key, where)
            except ConfigError as err:
                if str(err).endswith("must be a finite number"):  # the right type, an impossible value
                    raise
                continue
        names = " or ".join(_type_name(option) for option in typing.get_args(kind))
        raise ConfigError(f"{where}: {key} = {value!r}: expected {names}")
    if kind is type(None):
        if value is None:
            return None
    elif origin is list:
        (item_kind,) = typing.get_args(kind)
        if isinstance(value, list):
            return [_coerce(item, item_kind, key, where) for item in value]
    elif kind is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        # YAML 1.1 reads 3e-4 (no dot) as a string; take it as the number the user meant.
        elif isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            number = float(value)
        if number is not None:
            # No setting means anything as NaN or an infinity (a NaN tolerance once trained nothing
            # and reported success); checked here once for every float field, present and future.
            if not math.isfinite(number):
                raise ConfigError(f"{where}: {key} = {value!r}: must be a finite number")
            return number
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is dict:
        if isinstance(value, dict):
            return dict(value)
    elif isinstance(value, kind):
        return value
    raise ConfigError(f"{where}: {key} = {value!r}: expected {_type_name(kind)}")


def _type_name(kind: Any) -> str:
    if typing.get_origin(kind) is list:
        return f"a list of {_type_name(typing.get_args(kind)[0])}"
    return "null" if kind is type(None) else kind.__name__
