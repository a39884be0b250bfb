"""Training runs of a study, each `distmaml train` in a fresh process (so peak memory and thread
settings are that run's alone), a few at a time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from distmaml.errors import TrainingError


def train_runs(config_path: str | Path, runs: list[list[str]], jobs: int = 1, log_dir: Path | None = None) -> None:
    """Train `config_path` once per entry of `runs` (each a list of key=value overrides), at most
    `jobs` at once. A run's output goes to log_dir/<n>.log (or nowhere); a failed run stops the
    others and the study, in one line (a TrainingError) with that run's command, log and last line."""
    pending = list(enumerate(runs))
    running: list[tuple[int, subprocess.Popen, Path | None]] = []
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    while pending or running:
        while pending and len(running) < max(jobs, 1):
            index, overrides = pending.pop(0)
            log = log_dir / f"run{index}.log" if log_dir else None
            if log:
                log.parent.mkdir(parents=True, exist_ok=True)
            out = open(log, "w") if log else subprocess.DEVNULL
            proc = subprocess.Popen([sys.executable, "-m", "distmaml", "train", str(config_path), *overrides],
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
            if log:
                out.close()
            running.append((index, proc, log))
        time.sleep(0.2)
        for entry in list(running):
            index, proc, log = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            if proc.returncode != 0:
                for _, other, _ in running:
                    other.terminate()
                tail = log.read_text().strip().splitlines()[-1:] if log else []
                raise TrainingError(f"study run `distmaml {' '.join(map(str, proc.args[3:]))}` exited "
                                    f"{proc.returncode}" + (f" ({log})" if log else "") + (f": {tail[0]}" if tail else ""))
