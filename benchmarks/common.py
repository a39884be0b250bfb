"""What every benchmark shares: the machine it ran on, timing, training's own meta-iteration, JSON.

Every benchmark times what training runs: the engine's MetaStep (sampling, meta-gradient, the
all-reduce, clipping, Adam), built from a config exactly as `distmaml train` builds it. Without a
data root, image tasks are generated (random pixels of the right shape): speed and memory do not
depend on what the pixels show.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from distmaml.build import build
from distmaml.config import Config, load_config
from distmaml.engine import dist
from distmaml.engine.step import MetaStep, make_optimizer
from distmaml.run.log import strict_json
from distmaml.tasks.image_folder import ImageFolderTasks
from distmaml.tasks.image_folder_data import SplitData

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def machine(device: torch.device) -> dict[str, Any]:
    """The machine and software a result was measured with."""
    info = {"torch": torch.__version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
            "cores": os.cpu_count(), "cpu": _cpu_name(), "device": str(device)}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def median_seconds(run: Callable[[], Any], windows: int = 5, seconds: float = 1.0, sync: Callable[[], None] = lambda: None,
                   min_calls: int = 1) -> float:
    """Median over `windows` windows of the seconds per call, each window at least `seconds` long.

    The median of several windows is robust to other work sharing the machine now and then.
    """
    per_call = []
    for _ in range(windows):
        sync()
        start, calls = time.perf_counter(), 0
        while calls < min_calls or time.perf_counter() - start < seconds:
            run()
            calls += 1
        sync()
        per_call.append((time.perf_counter() - start) / calls)
    return statistics.median(per_call)


class GeneratedImageTasks(ImageFolderTasks):
    """N-way K-shot image tasks over generated pixels (uniform random uint8), in the shape
    task.channels x task.image_size^2: the real image_folder family's code path (the array on the
    device, episodes gathered there), for speed and memory, which depend on shapes, not on what the
    images show. Name it in a config as task.family: benchmarks.common:GeneratedImageTasks."""

    @classmethod
    def from_config(cls, config, device, dtype=torch.float32, classes: int = 64, per_class: int = 20):
        shape = (config.task.channels, config.task.image_size, config.task.image_size)

        def split(seed: int) -> SplitData:
            generator = torch.Generator().manual_seed(seed)
            pixels = torch.randint(0, 256, (classes * per_class, *shape), generator=generator, dtype=torch.uint8)
            counts = np.full(classes, per_class, dtype=np.int64)
            return SplitData(pixels.numpy(), [f"class{c}" for c in range(classes)],
                             np.arange(classes, dtype=np.int64) * per_class, counts)

        return cls(split(0), split(1), config.task.ways, config.task.support, config.task.query, config.train.seed,
                   device, dtype, config.data.storage)


OMNIGLOT_SHAPED = ["task.family=benchmarks.common:GeneratedImageTasks", "task.image_size=28", "task.channels=1",
                   "model.kind=conv4", "model.channels=64", "task.args.classes=100", "task.args.per_class=20"]
MINIIMAGENET_SHAPED = ["task.family=benchmarks.common:GeneratedImageTasks", "task.image_size=84", "task.channels=3",
                       "task.args.classes=64", "task.args.per_class=40"]


def fresh_process(script: str, *args: str, what: str) -> dict[str, Any]:
    """The last line `python -c script args...` printed, as JSON, run in a fresh one-thread process (a
    memory measurement's: its peak is its own); a failure ends the benchmark naming `what`."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", script, *args], cwd=REPO, capture_output=True, text=True,
                          env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "",
                               "MALLOC_MMAP_THRESHOLD_": "65536"})
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def config_for(base: str | Path, overrides: list[str]) -> Config:
    return load_config(base, ["logging.progress=false", "engine.memory_check=false", *overrides])


def meta_step(config: Config, device: torch.device | str = "cpu", static: bool = False) -> tuple[MetaStep, Any]:
    """Training's own meta-iteration for `config`, on this process alone, and the learner it trains."""
    torch.manual_seed(config.train.seed)
    device = torch.device(device)
    learner = build(config, device)
    optimizer = make_optimizer(learner.theta.values(), config.train.lr, device)
    return MetaStep(learner, optimizer, config, dist.Context(device=device), static=static), learner


def write(result: dict[str, Any], out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(strict_json(result))
    return out


def read(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def one_line(err: BaseException, limit: int | None = 100) -> str:
    """An exception as a table cell or a reason: its type and the first line of its message."""
    return f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:limit]}"
