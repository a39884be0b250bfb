"""The `distmaml` command: parse, call the library, print. Every subcommand is a thin layer.

    distmaml train CONFIG [key.sub=value ...]
    distmaml eval CHECKPOINT [--tasks N] [--shots N] [--query N] [--steps S] [--json PATH]   # default: the run's eval.*
    distmaml plot CHECKPOINT OUT.png [--tasks 3] [--shots N]
    distmaml study inner-steps CONFIG [--steps 1 5 10 20 50 100] [--iterations N] [--out DIR]
    distmaml study seeds CONFIG [--seeds 0 1 2 3 4] [--shots 5 10] [--steps S] [--tasks 600] [--out DIR]
    distmaml gradcheck CONFIG [key.sub=value ...] [--tasks 4] [--json PATH]
    distmaml config [CONFIG] [key.sub=value ...]      # print the resolved config with every key's doc
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

import yaml

from distmaml.config import ConfigError, describe, flatten, from_flat, load_config, to_dict
from distmaml.errors import DistmamlError, TrainingError, WriteError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distmaml", description="Exact, batched, distributed bi-level optimization "
                                     "and meta-learning.")
    commands = parser.add_subparsers(dest="command", required=True)

    train_p = commands.add_parser("train", help="meta-train from a YAML config")
    train_p.add_argument("config", help="YAML file, e.g. configs/sine_maml.yaml")
    train_p.add_argument("overrides", nargs="*", help="key.sub=value settings that replace the file's")

    eval_p = commands.add_parser("eval", help="adapt a trained model to fresh tasks and report query metrics")
    eval_p.add_argument("checkpoint", help="a checkpoint file, or a run directory (its newest checkpoint)")
    eval_p.add_argument("--tasks", type=int, help="fresh tasks (default: eval.tasks of the run)")
    eval_p.add_argument("--shots", type=int, help="support examples per task (default: the training K); few-shot "
                        "tasks only")
    eval_p.add_argument("--steps", type=int, help="inner steps; metrics are reported after 0..S")
    eval_p.add_argument("--query", type=int, help="query examples per task (default: eval.query); few-shot tasks only")
    eval_p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or auto")
    eval_p.add_argument("--data-root", help="where the data set is now, if it moved since training (data.root)")
    eval_p.add_argument("--json", type=Path, help="also write the result here")
    eval_p.add_argument("--user-code", choices=("same", "any"), help="files the run imported by path: same (default) "
                        "refuses one changed since the checkpoint was written; any runs it as it is now")
    eval_p.add_argument("--lr-grid", nargs=3, type=float, metavar=("LOW", "HIGH", "COUNT"),
                        help="also train the tasks by plain SGD at COUNT rates spaced evenly in log from LOW to HIGH "
                             "(a grid search beside a learned rate)")

    plot_p = commands.add_parser("plot", help="sine: true function, support points, fit before/after adaptation; a "
                                 "learned activation function beside ELU, ReLU and Swish; distilled examples")
    plot_p.add_argument("checkpoint", help="a checkpoint file or a run directory")
    plot_p.add_argument("out", type=Path, help="image file to write; its extension gives the format (.png, .pdf, "
                        ".svg, ...; PNG without one)")
    plot_p.add_argument("--tasks", type=int, default=3, help="tasks to draw, one panel each")
    plot_p.add_argument("--shots", type=int, help="support points (default: the training K); few-shot tasks only")
    plot_p.add_argument("--data-root", help="where the data set is now, if it moved since training (data.root)")

    study_p = commands.add_parser("study", help="several training runs compared in one table")
    studies = study_p.add_subparsers(dest="study", required=True)
    steps_p = studies.add_parser("inner-steps", help="accuracy, over-fitting, time and memory against K")
    steps_p.add_argument("config", help="YAML file to vary, e.g. configs/sine_maml.yaml")
    steps_p.add_argument("overrides", nargs="*", help="key.sub=value settings shared by every run")
    steps_p.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20, 50, 100], help="values of K")
    steps_p.add_argument("--modes", nargs="+", default=["second_order", "first_order"],
                         choices=["second_order", "first_order"])
    steps_p.add_argument("--iterations", type=int, default=2000, help="meta-iterations per run")
    steps_p.add_argument("--out", type=Path, default=Path("runs/study_inner_steps"), help="output folder")
    seeds_p = studies.add_parser("seeds", help="a config over training seeds and thread counts, with divergence")
    seeds_p.add_argument("config", help="YAML file, e.g. configs/sine_maml.yaml")
    seeds_p.add_argument("overrides", nargs="*", help="key.sub=value settings shared by every run")
    seeds_p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="train.seed values")
    seeds_p.add_argument("--threads", type=int, nargs="+", default=[1], help="engine.threads values")
    seeds_p.add_argument("--shots", type=int, nargs="+", help="support points at evaluation (default: 5 10); few-shot "
                         "tasks only")
    seeds_p.add_argument("--steps", type=int, help="inner steps at evaluation, reported after 0..S (default: 10 for "
                         "few-shot tasks, the config's eval.steps for training runs)")
    seeds_p.add_argument("--tasks", type=int, default=600, help="fresh evaluation tasks (the same for every run)")
    seeds_p.add_argument("--jobs", type=int, default=1, help="training runs at once")
    seeds_p.add_argument("--out", type=Path, default=Path("runs/study_seeds"), help="output folder")

    check_p = commands.add_parser("gradcheck", help="every hypergradient method against finite differences and a "
                                  "dense implicit solve, in float64 on a few tasks")
    check_p.add_argument("config", help="YAML file, e.g. configs/logistic_weight_decay.yaml")
    check_p.add_argument("overrides", nargs="*", help="key.sub=value settings that replace the file's")
    check_p.add_argument("--tasks", type=int, default=4, help="tasks of the first training batch (default 4)")
    check_p.add_argument("--json", type=Path, help="also write the result here")

    config_p = commands.add_parser("config", help="print the resolved config, or every key with its doc")
    config_p.add_argument("config", nargs="?", help="YAML file (omit to list every key with its doc)")
    config_p.add_argument("overrides", nargs="*", help="key.sub=value settings")

    args = parser.parse_args(argv)
    try:
        code = _COMMANDS[args.command](args)
    except DistmamlError as err:
        print(f"distmaml {args.command}: error: {err}", file=sys.stderr)
        code = 1 if isinstance(err, (TrainingError, WriteError)) else 2  # the run failed, or its input was bad
    except KeyboardInterrupt:  # Ctrl-C outside training (eval, plot, study, config)
        print(f"distmaml {args.command}: interrupted", file=sys.stderr)
        code = 128 + signal.SIGINT
    _leave_if_process_group_left_behind(code)
    return code


def _leave_if_process_group_left_behind(code: int) -> None:
    """A rank that failed still holds its process group (destroying it while peers may be inside a
    collective can hang, torchtitan#1342), and exiting the interpreter with gloo's worker threads
    alive can abort ("terminate called without an active exception", pytorch#190489). Such a rank
    has printed its one line and saved what it could: it leaves at once with its own status."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _train(args) -> int:
    from distmaml.commands.train import train

    summary = train(load_config(args.config, args.overrides))
    if summary["status"] == "preempted":
        return 128 + summary["signal"]  # as a shell reports a job ended by that signal
    if "eval" in summary:
        from distmaml.evaluate import evaluated, format_table

        print(f"evaluation at the end of training: {evaluated(summary['eval'])}")  # which row of a results table
        print(format_table(summary["eval"]))
    if summary["status"] == "diverged":
        raise TrainingError(summary["error"])
    return 0


def _with_flags(config, flags: dict[str, tuple[object, str]]):
    """`config` with the settings the command-line flags give ({key: (value or None, flag)}),
    validated like the config keys they stand for, errors naming the flag."""
    given = {key: value for key, (value, _) in flags.items() if value is not None}
    if not given:
        return config
    return from_flat({**flatten(config), **given}, {key: flags[key][1] for key in given})


def _device(value: str, flag: str):
    """A device flag, checked like engine.device (its form, then this machine), errors naming the flag."""
    from distmaml.engine.dist import pick_device

    from_flat({"engine.device": value}, {"engine.device": flag})
    return pick_device(value, 0, key=flag)


# Evaluation's settings as the flags of eval and plot name them (for the memory check's message).
_EVAL_FLAGS = {"tasks": "--tasks", "shots": "--shots", "query": "--query"}
_PLOT_FLAGS = {**_EVAL_FLAGS, "query": "eval.query"}  # plot has no --query: its points are the run's setting


def _eval(args) -> int:
    from distmaml.engine import memory
    from distmaml.evaluate import (divergence_warning, evaluate, evaluated, evaluation_settings, format_table,
                                   refuse_shots)
    from distmaml.files import check_file_path
    from distmaml.run.log import write_json
    from distmaml.run.restore import load_trained

    if args.json is not None:  # before the work, not after it
        check_file_path(args.json, "--json")
    device = _device(args.device, "--device")
    trained = load_trained(args.checkpoint, str(device), {
        "data.root": (args.data_root, "--data-root"), "eval.steps": (args.steps, "--steps"),
        "eval.tasks": (args.tasks, "--tasks"), "eval.shots": (args.shots, "--shots"),
        "eval.query": (args.query, "--query"), "eval.lr_grid": (_log_grid(args.lr_grid), "--lr-grid"),
        "run.user_code": (args.user_code, "--user-code")})
    config, learner = trained.config, trained.learner
    settings = evaluation_settings(config)
    refuse_shots(learner.family, settings, {key: _EVAL_FLAGS[key] if given is not None else f"eval.{key}"
                                            for key, given in (("shots", args.shots), ("query", args.query))},
                 config.task.family)
    memory.check_evaluation_fits(learner.problem, learner.theta, learner.family, learner.inner, settings, config,
                                 device, _EVAL_FLAGS)
    result = evaluate(learner.problem, learner.theta, learner.family, learner.inner, **settings)
    print(f"{trained.checkpoint}: {evaluated(result)}, inner rule {config.inner.rule} (lr {config.inner.lr})")
    print(format_table(result))
    for warning in (result.get("beyond_trained_steps"), divergence_warning(result)):
        if warning:
            print(f"distmaml eval: warning: {warning}", file=sys.stderr)
    if args.json:
        write_json(args.json, result)
    return 0


def _log_grid(spec: list[float] | None) -> list[float] | None:
    """--lr-grid LOW HIGH COUNT as the COUNT rates, or a one-line refusal."""
    if spec is None:
        return None
    low, high, count = spec
    if count != int(count) or count < 1:
        raise ConfigError(f"--lr-grid {low:g} {high:g} {count:g}: COUNT must be a whole number >= 1 (the grid would be "
                          "empty)")
    if not 0 < low <= high:
        raise ConfigError(f"--lr-grid {low:g} {high:g} {count:g}: needs 0 < LOW <= HIGH")
    count = int(count)
    return [low * (high / low) ** (i / max(count - 1, 1)) for i in range(count)]


def _plot(args) -> int:
    import torch

    from distmaml.commands.plots import DRAWINGS, MAX_TASKS, STEPS, check_output, plot_sine_adaptation
    from distmaml.engine import memory
    from distmaml.evaluate import refuse_shots
    from distmaml.run.restore import load_trained

    image_format = check_output(args.out, "OUT")
    if not 1 <= args.tasks <= MAX_TASKS:
        raise ConfigError(f"--tasks = {args.tasks}: must be between 1 and {MAX_TASKS} (one panel per task, side by side)")
    trained = load_trained(args.checkpoint, changes={"data.root": (args.data_root, "--data-root"),
                                                     "eval.shots": (args.shots, "--shots")})
    config, learner = trained.config, trained.learner
    refuse_shots(learner.family, {"shots": args.shots}, {"shots": "--shots"}, config.task.family)
    # The problem says what of phi it can draw (learned examples, a learned function), if anything.
    drawing = getattr(learner.problem, "drawing", None)
    found = drawing(learner.theta) if callable(drawing) else None
    if found is not None:
        kind, data = found
        if kind not in DRAWINGS:
            raise ConfigError(f"{trained.checkpoint}: {type(learner.problem).__name__}.drawing() asks for a "
                              f"{kind!r} figure; distmaml plot draws {', '.join(DRAWINGS)}")
        DRAWINGS[kind](data, args.out, image_format=image_format)
        print(f"wrote {args.out} ({image_format.upper()})")
        return 0
    if learner.family.is_classification or not all(hasattr(learner.family, name) for name in ("x_range", "curve")):
        kind = "classification" if learner.family.is_classification else "regression without a true curve to draw"
        raise ConfigError(f"{trained.checkpoint}: distmaml plot draws one-dimensional regression tasks with their "
                          f"true curve (the sine family), a learned activation function or distilled examples; "
                          f"this run is {trained.config.task.family} {kind}")
    memory.check_evaluation_fits(learner.problem, learner.theta, learner.family, learner.inner,
                                 {"tasks": args.tasks, "shots": config.eval.shots, "steps": max(STEPS)}, config,
                                 torch.device("cpu"), _PLOT_FLAGS)
    plot_sine_adaptation(learner.problem, learner.theta, learner.family, learner.inner, args.out, tasks=args.tasks,
                         shots=config.eval.shots, image_format=image_format)
    print(f"wrote {args.out} ({image_format.upper()})")
    return 0


def _study(args) -> int:
    from distmaml.files import check_folder_path

    check_folder_path(args.out, "--out")  # before any run is trained
    config = load_config(args.config, args.overrides)  # fail here, once, on a bad setting
    if args.study == "inner-steps":
        from distmaml.commands.study import HEADER, run_inner_steps_study

        for k in args.steps:
            _with_flags(config, {"inner.steps": (k, "--steps"), "eval.steps": (k, "--steps")})
        _with_flags(config, {"train.iterations": (args.iterations, "--iterations")})
        print(f"{args.iterations} meta-iterations per run; results in {args.out}\n{HEADER}", flush=True)
        run_inner_steps_study(args.config, args.out, args.steps, args.modes, args.iterations, args.overrides)
        return 0
    from distmaml.commands.study import run_seeds_study
    from distmaml.commands.study.seeds import check_evaluation, format_report, study_evaluation

    _with_flags(config, {"eval.steps": (args.steps, "--steps"), "eval.tasks": (args.tasks, "--tasks")})
    for count in args.shots or ():
        _with_flags(config, {"eval.shots": (count, "--shots")})
    for count in args.threads:
        _with_flags(config, {"engine.threads": (count, "--threads")})
    shots, steps = study_evaluation(config, args.shots, args.steps)
    check_evaluation(config, shots, steps, args.tasks)  # before training, not after it
    print(f"{len(args.seeds) * len(args.threads)} training runs; results in {args.out}", flush=True)
    report = run_seeds_study(args.config, args.out, args.seeds, args.threads, shots, steps, args.tasks, args.jobs,
                             args.overrides)
    print(format_report(report))
    return 0


def _gradcheck(args) -> int:
    import dataclasses

    import torch

    from distmaml.build import build, build_method
    from distmaml.engine.preflight import refuse_unreached
    from distmaml.errors import SettingError
    from distmaml.meta import METHODS, check_problem, task_at
    from distmaml.meta.gradcheck import format_report, gradcheck
    from distmaml.rng import STREAM_TRAIN
    from distmaml.run.log import write_json

    # gradcheck runs every method: no method's settings are unused here.
    config = load_config(args.config, [*args.overrides, "engine.dtype=float64", "engine.device=cpu"], every_method=True)
    if args.json is not None:
        from distmaml.files import check_file_path

        check_file_path(args.json, "--json")
    if args.tasks < 1:
        raise ConfigError(f"--tasks = {args.tasks}: must be >= 1")
    torch.manual_seed(config.train.seed)
    learner = build(config)
    if not learner.theta:
        raise ConfigError(f"{args.config}: problem.name = {config.problem.name}: has no meta-parameters (its online "
                          "runs are the result), so there is no hypergradient to check")
    tasks = learner.family.sample(STREAM_TRAIN, 0, torch.arange(args.tasks))
    check_problem(learner.problem, learner.theta, task_at(tasks, 0), where=f"problem.name = {config.problem.name!r}:")
    refuse_unreached(config, learner, tasks)  # the trainer's refusal, in its words: there is nothing to check
    methods, skipped = {}, {}
    for name in dict.fromkeys([*METHODS, config.inner.mode]):
        try:
            methods[name] = build_method(config, name)
        except SettingError as err:
            skipped[name] = str(err)
    problem, inner, what = learner.problem, learner.inner, f"{args.tasks} task(s)"
    from distmaml.meta.online import check_mode

    for name in list(methods):  # a method the schedule cannot run (PES episodic, or an odd number of runs)
        try:
            check_mode(learner.problem, dataclasses.replace(inner, method=methods[name]), bool(config.online.runs),
                       config.online.horizon, config.online.burn_in, config.online.runs and args.tasks)
        except SettingError as err:
            skipped[name] = str(err)
            del methods[name]
    if config.online.runs:  # from the runs' stored state: the U-step objective of their first outer step
        from distmaml.engine.schedule import first_lookahead

        problem, tasks, inner = first_lookahead(learner, config, args.tasks)
        what = f"{args.tasks} online run(s) at their staggered counters"
    report = gradcheck(problem, learner.theta, tasks, inner, methods)
    print(f"{args.config}: problem {config.problem.name}, {what}, {config.inner.steps} inner step(s) of "
          f"{config.inner.rule}, float64")
    print(format_report(report))
    if args.json:
        write_json(args.json, {"methods": {name: {"rel_error": check.rel_error, "reference": check.reference,
                                                  "exact": check.exact, "tolerance": check.tolerance,
                                                  **({"z": check.z, "particles": check.particles}
                                                     if check.z is not None else {})}
                                           for name, check in report.items() if check.skipped is None},
                               "skipped": {**skipped, **{name: check.skipped for name, check in report.items()
                                                         if check.skipped is not None}}})
    failed = [name for name, check in report.items() if check.failed]
    if failed:
        print(f"distmaml gradcheck: error: {', '.join(failed)} should equal the reference and do not",
              file=sys.stderr)
        return 1
    return 0


def _config(args) -> int:
    if args.config is None:
        print(describe())
    else:
        print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


_COMMANDS = {"train": _train, "eval": _eval, "plot": _plot, "study": _study, "gradcheck": _gradcheck,
             "config": _config}
