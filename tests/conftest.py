import contextlib
import os
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# How far the memory estimate made before training may be from the peak it estimates, wherever that peak
# is measured: bytes counted on meta tensors (test_memory.py) or a fresh process's resident set
# (test_benchmarks.py).
ESTIMATE_BOUND = 0.10
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _deterministic_threads():
    # Tests compare numbers across runs and processes; one thread keeps reductions in one order.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def sine_run(tmp_path_factory):
    """One tiny trained run, shared by the tests that only read it (eval, plot, the command line's flags):
    configs/sine_debug.yaml for 60 meta-iterations, in this process, its last checkpoint at 60 and its
    evaluation in summary.json. A test that writes into a run directory trains its own."""
    from distmaml.config import load_config
    from distmaml.train import train

    run = tmp_path_factory.mktemp("sine_run")
    threads = torch.get_num_threads()
    train(load_config(REPO / "configs/sine_debug.yaml", [f"run.dir={run}", "train.iterations=60", "eval.tasks=50",
                                                         "logging.progress=false"]))
    torch.set_num_threads(threads)
    return run


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


@contextlib.contextmanager
def run_dir_held_by_another_process(run_dir):
    """A child process holding `run_dir`'s trainer lock (distmaml's own RunLock) until the block ends,
    then killed with -9, as a crashed trainer would be; yields the child."""
    import subprocess

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom distmaml.checkpoint import RunLock\n"
                               "lock = RunLock(sys.argv[1]).acquire()\nprint('locked', flush=True)\ntime.sleep(60)",
                               str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()  # kill -9: the kernel releases the lock with the process
        holder.wait()
