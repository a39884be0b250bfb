"""The `distmaml` command: parse, call the library, print. Every subcommand is a thin layer.

    distmaml train CONFIG [key.sub=value ...]
    distmaml eval CHECKPOINT [--tasks 600] [--shots N] [--steps S] [--json PATH]
    distmaml plot CHECKPOINT OUT.png
    distmaml study inner-steps CONFIG [--steps 1 5 10 20 50 100] [--iterations N] [--out DIR]
    distmaml config [CONFIG] [key.sub=value ...]      # print the resolved config with every key's doc
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

import yaml

from distmaml.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from distmaml.config import ConfigError, describe, from_dict, load_config, to_dict


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="distmaml", description="Exact, batched, distributed MAML.")
    commands = parser.add_subparsers(dest="command", required=True)

    train_p = commands.add_parser("train", help="meta-train from a YAML config")
    train_p.add_argument("config", help="YAML file, e.g. configs/sine_maml.yaml")
    train_p.add_argument("overrides", nargs="*", help="key.sub=value settings that replace the file's")

    eval_p = commands.add_parser("eval", help="adapt a trained model to fresh tasks and report query metrics")
    eval_p.add_argument("checkpoint", help="a checkpoint file, or a run directory (its newest checkpoint)")
    eval_p.add_argument("--tasks", type=int, help="fresh tasks (default: eval.tasks of the run)")
    eval_p.add_argument("--shots", type=int, help="support examples per task (default: the training K)")
    eval_p.add_argument("--steps", type=int, help="inner steps; metrics are reported after 0..S")
    eval_p.add_argument("--query", type=int, help="query examples per task (default: eval.query)")
    eval_p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    eval_p.add_argument("--json", type=Path, help="also write the result here")

    plot_p = commands.add_parser("plot", help="sine: true function, support points, fit before/after adaptation")
    plot_p.add_argument("checkpoint", help="a checkpoint file or a run directory")
    plot_p.add_argument("out", type=Path, help="PNG file to write")
    plot_p.add_argument("--tasks", type=int, default=3, help="tasks to draw")
    plot_p.add_argument("--shots", type=int, help="support points (default: the training K)")

    study_p = commands.add_parser("study", help="studies; inner-steps: accuracy, over-fitting, time, memory vs K")
    study_p.add_argument("study", choices=["inner-steps"])
    study_p.add_argument("config", help="YAML file to vary, e.g. configs/sine_maml.yaml")
    study_p.add_argument("overrides", nargs="*", help="key.sub=value settings shared by every run")
    study_p.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10, 20, 50, 100], help="values of K")
    study_p.add_argument("--modes", nargs="+", default=["second_order", "first_order"],
                         choices=["second_order", "first_order"])
    study_p.add_argument("--iterations", type=int, default=2000, help="meta-iterations per run")
    study_p.add_argument("--out", type=Path, default=Path("runs/study_inner_steps"), help="output folder")

    config_p = commands.add_parser("config", help="print the resolved config, or every key with its doc")
    config_p.add_argument("config", nargs="?", help="YAML file (omit to list every key with its doc)")
    config_p.add_argument("overrides", nargs="*", help="key.sub=value settings")

    args = parser.parse_args(argv)
    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"distmaml {args.command}: error: {err}", file=sys.stderr)
        return 2


def _train(args) -> int:
    from distmaml.train import train

    config = load_config(args.config, args.overrides)
    summary = train(config)
    code = 0
    if summary["status"] == "preempted":
        code = 128 + summary["signal"]  # as a shell reports a job ended by that signal
    elif "eval" in summary:
        from distmaml.evaluate import format_table

        print(format_table(summary["eval"]))
    if summary["world_size"] > 1:
        # Everything is saved and the process group is gone. Leave without the interpreter's
        # teardown: there, a distributed rank occasionally aborted ("terminate called without an
        # active exception", seen once under torchrun on gloo) after finishing its work, which
        # launchers then report as a failed run.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def load_trained(path: str | Path, device: str = "cpu"):
    """(config, model, params, task family) of a checkpoint file or a run directory's newest one."""
    from distmaml.models import build_model
    from distmaml.tasks import build_task_family
    from distmaml.engine import DTYPES

    path = Path(path)
    if path.is_dir():
        found = latest_checkpoint(path / "checkpoints") or latest_checkpoint(path)
        if found is None:
            raise CheckpointError(f"{path}: no checkpoint in this run directory")
        path = found
    state = load_checkpoint(path)
    config = from_dict(state["config"], str(path))
    dtype = DTYPES[config.engine.dtype][0]
    model = build_model(config).to(device, dtype)
    model.load_state_dict(state["model"])
    return config, model, dict(model.named_parameters()), build_task_family(config, device, dtype)


def _eval(args) -> int:
    from distmaml.evaluate import evaluate, evaluation_settings, format_table

    config, model, params, family = load_trained(args.checkpoint, args.device)
    settings = evaluation_settings(config)
    for name in ("steps", "tasks", "shots", "query"):
        if getattr(args, name) is not None:
            settings[name] = getattr(args, name)
    result = evaluate(model, params, family, **settings)
    print(f"{args.checkpoint}: {result['tasks']} fresh tasks, {result['shots']}-shot, inner lr {config.inner.lr}")
    print(format_table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


def _plot(args) -> int:
    from distmaml.plots import plot_sine_adaptation

    config, model, params, family = load_trained(args.checkpoint)
    plot_sine_adaptation(model, params, family, config.inner.lr, args.out, tasks=args.tasks, shots=args.shots)
    print(f"wrote {args.out}")
    return 0


def _study(args) -> int:
    from distmaml.study import HEADER, run_inner_steps_study

    load_config(args.config, args.overrides)  # fail here, once, on a bad setting
    print(f"{args.iterations} meta-iterations per run; results in {args.out}\n{HEADER}", flush=True)
    run_inner_steps_study(args.config, args.out, args.steps, args.modes, args.iterations, args.overrides)
    return 0


def _config(args) -> int:
    if args.config is None:
        print(describe())
    else:
        print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


_COMMANDS = {"train": _train, "eval": _eval, "plot": _plot, "study": _study, "config": _config}
