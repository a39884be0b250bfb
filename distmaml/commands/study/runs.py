"""Training runs of a study, each `distmaml train` in a fresh process (so peak memory and thread
settings are that run's alone), a few at a time."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from distmaml.errors import TrainingError


def train_runs(config_path: str | Path, runs: list[list[str]], run_dirs: list[Path], jobs: int = 1,
               log_dir: Path | None = None) -> list[str]:
    """Train `config_path` once per entry of `runs` (each a list of key=value overrides, whose run.dir
    is the matching entry of `run_dirs`), at most `jobs` at once; return each run's status.

    A run that diverged is a result ("diverged"), not a failure of the study: it exits 1 after writing
    that status to its summary.json. Any other failed run stops the others and the study, in one line
    (a TrainingError) with that run's command, log and last line. A run's output goes to
    log_dir/run<n>.log (or nowhere).
    """
    pending = list(enumerate(runs))
    running: list[tuple[int, subprocess.Popen, Path | None, float]] = []
    statuses = ["complete"] * len(runs)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    while pending or running:
        while pending and len(running) < max(jobs, 1):
            index, overrides = pending.pop(0)
            log = log_dir / f"run{index}.log" if log_dir else None
            if log:
                log.parent.mkdir(parents=True, exist_ok=True)
            out = open(log, "w") if log else subprocess.DEVNULL
            started = time.time()
            proc = subprocess.Popen([sys.executable, "-m", "distmaml", "train", str(config_path), *overrides],
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
            if log:
                out.close()
            running.append((index, proc, log, started))
        time.sleep(0.2)
        for entry in list(running):
            index, proc, log, started = entry
            if proc.poll() is None:
                continue
            running.remove(entry)
            statuses[index] = _status(run_dirs[index], started)
            if proc.returncode != 0 and statuses[index] != "diverged":
                for _, other, _, _ in running:
                    other.terminate()
                tail = log.read_text().strip().splitlines()[-1:] if log else []
                raise TrainingError(f"study run `distmaml {' '.join(map(str, proc.args[3:]))}` exited "
                                    f"{proc.returncode}" + (f" ({log})" if log else "") + (f": {tail[0]}" if tail else ""))
    return statuses


def _status(run_dir: Path, since: float) -> str:
    """The status a run wrote to its summary.json since `since` (a summary from before is not this run's)."""
    summary = Path(run_dir) / "summary.json"
    try:
        if summary.stat().st_mtime < since - 1:
            return "failed"
        return str(json.loads(summary.read_text())["status"])
    except (OSError, ValueError, KeyError, TypeError):
        return "failed"
