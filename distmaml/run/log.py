"""Where metrics go: metrics.jsonl (the readable record), a progress bar, Python logging, wandb.

Only the main process gets a RunLogger; every other rank gets a NullLogger with the same methods,
so the training loop never asks which rank it is on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from distmaml.errors import ConfigError
from distmaml.files import append_text, write_text

log = logging.getLogger("distmaml")


def setup_logging(rank: int) -> None:
    """Console logging: INFO on the main process, warnings only from the others, rank-prefixed."""
    prefix = f"[rank {rank}] " if rank else ""
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
                        force=True)


class NullLogger:
    """The logger of non-main ranks: accepts everything, writes nothing."""

    wandb_run = None

    def start(self, first_iteration: int, total: int) -> None: ...

    def advance(self, iteration: int) -> None: ...

    def inner_progress(self, total: int):
        """A callback for the inner steps of one outer step (a second progress bar), or None."""
        return None

    def log(self, metrics: dict[str, Any]) -> None: ...

    def summary(self, summary: dict[str, Any]) -> None: ...

    def close(self) -> None: ...


class RunLogger(NullLogger):
    """The main process's logger for one run directory."""

    def __init__(self, run_dir: str | Path, config_dict: dict[str, Any], progress: bool = True,
                 wandb: bool = False, wandb_project: str = "distmaml", wandb_name: str | None = None,
                 wandb_mode: str = "auto", wandb_timeout: float = 30.0) -> None:
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self._progress = progress and sys.stderr.isatty()
        self._bar: tqdm | None = None
        self._redirect = contextlib.ExitStack()
        self.wandb_run = (self._start_wandb(config_dict, wandb_project, wandb_name, wandb_mode, wandb_timeout)
                          if wandb else None)

    def _start_wandb(self, config_dict, project, name, mode, timeout):
        import wandb  # only the main process, and only when asked, pays for the import

        if mode == "auto":
            mode = os.environ.get("WANDB_MODE") or ("online" if os.environ.get("WANDB_API_KEY") else "offline")
        # A stable id in the run directory makes a resumed or requeued job continue the same wandb run.
        id_file = self.run_dir / "wandb_id"
        run_id = id_file.read_text().strip() if id_file.exists() else secrets.token_hex(4)
        write_text(id_file, run_id)

        def start(mode: str):
            return wandb.init(project=project, name=name or self.run_dir.name, id=run_id, resume="allow",
                              dir=str(self.run_dir), config=config_dict, mode=mode,
                              settings=wandb.Settings(init_timeout=timeout))

        try:
            return start(mode)
        except wandb.errors.UsageError as err:
            if "api key" in str(err).lower():
                raise ConfigError("logging.wandb_mode = online: wandb has no API key (set WANDB_API_KEY or run "
                                  "`wandb login`), or use logging.wandb_mode=offline") from None
            raise ConfigError(f"logging.wandb: wandb refused to start ({str(err).splitlines()[0]})") from None
        except wandb.errors.CommError as err:
            # An unreachable server must not stop (or stall) training: keep the metrics offline.
            log.warning("wandb could not reach its server within logging.wandb_timeout = %g s (%s); logging "
                        "offline in %s (`wandb sync` uploads it later)", timeout, str(err).splitlines()[0][:120],
                        self.run_dir / "wandb")
            wandb.teardown()  # the failed attempt still holds the run id in wandb's service process
            return start("offline")

    def start(self, first_iteration: int, total: int) -> None:
        """Begin at `first_iteration` (> 0 after a resume): drop metrics lines the checkpoint never saw,
        and a torn line (a kill mid-append leaves half a line) with a warning. The file is rewritten
        atomically: a full disk here leaves it as it was."""
        if self.metrics_path.exists():
            kept = []
            lines = self.metrics_path.read_text(errors="replace").splitlines()
            for number, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                    iteration = int(record.get("iteration", 0))
                except (ValueError, TypeError, AttributeError):
                    where = "its last line" if number == len(lines) else f"line {number}"
                    log.warning("%s: %s is torn or not JSON; dropped it", self.metrics_path, where)
                    continue
                if iteration <= first_iteration:
                    kept.append(line)
            write_text(self.metrics_path, "".join(line + "\n" for line in kept))
        if self._progress:
            self._redirect.enter_context(logging_redirect_tqdm())
            self._bar = tqdm(total=total, initial=first_iteration, desc="meta-train", unit="it", dynamic_ncols=True)

    def advance(self, iteration: int) -> None:
        if self._bar is not None:
            self._bar.update(iteration - self._bar.n)

    def inner_progress(self, total: int):
        if not self._progress:
            return None
        bar = tqdm(total=total, desc="inner steps", unit="step", position=1, leave=False, dynamic_ncols=True)
        self._redirect.callback(bar.close)

        def done(steps: int) -> None:
            if steps < bar.n:  # the next outer step's unroll begins
                bar.reset()
            bar.update(steps - bar.n)

        return done

    def log(self, metrics: dict[str, Any]) -> None:
        append_text(self.metrics_path, json.dumps(metrics) + "\n")
        if self._bar is not None:
            self._bar.set_postfix(meta_loss=f"{metrics['meta_loss']:.4f}", refresh=False)
        # The outer loss's data: "query" for few-shot tasks, "validation" for training runs.
        outer = next(key[:-len("_loss_before")] for key in metrics if key.endswith("_loss_before"))
        accuracy = ""
        if f"{outer}_accuracy_after" in metrics:
            accuracy = (f" | {outer} accuracy before {100 * metrics[f'{outer}_accuracy_before']:.1f}% "
                        f"after {100 * metrics[f'{outer}_accuracy_after']:.1f}%")
        log.info("iter %d | meta-loss %.4f | %s loss before %.4f after %.4f%s | %.0f tasks/s",
                 metrics["iteration"], metrics["meta_loss"], outer, metrics[f"{outer}_loss_before"],
                 metrics[f"{outer}_loss_after"], accuracy, metrics["tasks_per_s"])
        if self.wandb_run is not None:
            self.wandb_run.log({k: v for k, v in metrics.items() if k != "iteration"}, step=metrics["iteration"], commit=True)

    def summary(self, summary: dict[str, Any]) -> None:
        if self.wandb_run is not None:
            self.wandb_run.summary.update(_scalars(summary))

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._redirect.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()
            self.wandb_run = None


def _scalars(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested summaries to 'a/b' keys of finite numbers and strings, as wandb shows them."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_scalars(value, name + "/"))
        elif isinstance(value, (int, str)) or (isinstance(value, float) and math.isfinite(value)):
            out[name] = value
    return out


def strict_json(data: Any) -> str:
    """JSON that every parser reads: NaN and infinities become null (the status or a count beside them
    says why), never the NaN / Infinity tokens that Python's json writes by default."""

    def clean(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {key: clean(item) for key, item in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(item) for item in value]
        return value

    return json.dumps(clean(data), indent=2, allow_nan=False) + "\n"


def write_json(path: str | Path, data: Any) -> None:
    """`data` as strict JSON, written atomically (a failed write leaves the file as it was)."""
    write_text(path, strict_json(data))
