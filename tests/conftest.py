import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests compare numbers across runs and processes; one thread keeps reductions in one order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def disk_full_after(monkeypatch):
    """disk_full_after(n): from now on, every file distmaml writes fails as a full disk after n bytes."""
    import errno
    import io

    from distmaml import files

    def install(limit: int) -> None:
        class FullDisk(io.RawIOBase):
            def __init__(self, path):
                self.file, self.written = open(path, "wb"), 0

            def writable(self):
                return True

            def write(self, data):
                if self.written + len(data) > limit:
                    raise OSError(errno.ENOSPC, "No space left on device")
                self.written += len(data)
                return self.file.write(data)

            def fileno(self):
                return self.file.fileno()

            def close(self):
                self.file.close()
                super().close()

        monkeypatch.setattr(files, "_open_for_writing", FullDisk)

    return install


def run_cli(args, cwd=None, env=None, timeout=300, check=True):
    """Run `python -m distmaml ...` in a fresh process; return the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run([sys.executable, "-m", "distmaml", *args], cwd=cwd or REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"distmaml {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc
