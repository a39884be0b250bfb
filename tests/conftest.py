import contextlib
import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

from examples.polynomials import PolynomialTasks

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
def omniglot_cache(tmp_path_factory):
    """omniglot_cache(root) -> a cache folder holding Omniglot decoded from `root`, shared by every test
    of the session and every xdist worker: the decode takes tens of seconds, so it runs once, under
    a lock the other workers wait on."""
    import fcntl

    from distmaml.tasks.omniglot_data import load_omniglot

    shared = tmp_path_factory.getbasetemp().parent / "omniglot-cache"  # the parent is common to all workers

    def decoded(root: Path) -> Path:
        shared.mkdir(parents=True, exist_ok=True)
        with open(shared / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            load_omniglot(root, shared)
        return shared

    return decoded


@pytest.fixture(scope="session")
def sine_run(tmp_path_factory):
    """One tiny trained run, shared by the tests that only read it (eval, plot, the command line's flags):
    configs/sine_debug.yaml for 60 meta-iterations, in this process, its last checkpoint at 60 and its
    evaluation in summary.json. A test that writes into a run directory trains its own."""
    from distmaml.commands.train import train
    from distmaml.config import load_config

    run = tmp_path_factory.mktemp("sine_run")
    threads = torch.get_num_threads()
    train(load_config(REPO / "configs/sine_debug.yaml", [f"run.dir={run}", "train.iterations=60", "eval.tasks=50",
                                                         "logging.progress=false"]))
    torch.set_num_threads(threads)
    return run


@pytest.fixture
def failing_disk(monkeypatch):
    """failing_disk(after=n, error=errno.ENOSPC, under=None): from now on every file distmaml writes or
    appends to (below the folder `under`, if given) fails with `error` once n more bytes went into it;
    after=None fails at the open, as a read-only folder does."""
    import errno
    import io
    import os
    from pathlib import Path

    from distmaml import files

    def install(after: int | None = 0, error: int = errno.ENOSPC, under=None) -> None:
        real_write, real_append = files._open_for_writing, files._open_for_appending

        class FailingFile(io.RawIOBase):
            def __init__(self, file):
                self.file, self.written = file, 0

            def writable(self):
                return True

            def write(self, data):
                if self.written + len(data) > after:
                    raise OSError(error, os.strerror(error))
                self.written += len(data)
                return self.file.write(data)

            def fileno(self):
                return self.file.fileno()

            def close(self):
                self.file.close()
                super().close()

        def opener(real):
            def open_(path):
                if under is not None and Path(under).resolve() not in Path(path).resolve().parents:
                    return real(path)
                if after is None:
                    raise OSError(error, os.strerror(error), str(path))
                return FailingFile(real(path))
            return open_

        monkeypatch.setattr(files, "_open_for_writing", opener(real_write))
        monkeypatch.setattr(files, "_open_for_appending", opener(real_append))

    return install


@pytest.fixture
def disk_full_after(failing_disk):
    """disk_full_after(n): from now on, every file distmaml writes fails as a full disk after n bytes."""
    return lambda limit: failing_disk(after=limit)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder where no file can be created: a chmod 555 one, or /sys where modes do not stop the user (root)."""
    import tempfile

    folder = tmp_path / "read_only"
    folder.mkdir()
    folder.chmod(0o555)
    for candidate in (folder, Path("/sys")):
        try:
            descriptor, probe = tempfile.mkstemp(dir=candidate)
        except OSError:
            yield candidate
            break
        os.close(descriptor)
        os.unlink(probe)
    else:
        pytest.skip("no folder here refuses new files")
    folder.chmod(0o755)


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

    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom distmaml.run.run_dir import RunLock\n"
                               "lock = RunLock(sys.argv[1]).acquire()\nlock.write_pid()\n"
                               "print('locked', flush=True)\ntime.sleep(60)",
                               str(run_dir)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        yield holder
    finally:
        holder.kill()  # kill -9: the kernel releases the lock with the process
        holder.wait()


@dataclasses.dataclass(frozen=True)
class Planted(PolynomialTasks):
    """The example family with one thing broken, as a subclass's `change(batch, iteration)` says: the
    user-family tests plant their bugs in it (named by import path, so each plant is a module-level
    class of its test module)."""

    @classmethod
    def from_config(cls, config, device, dtype=torch.float32, degree: int = 3):
        return cls(seed=config.train.seed, support=config.task.support, query=config.task.query, degree=degree,
                   device=device, dtype=dtype)

    def sample(self, stream, iteration, indices, support=None, query=None):
        return self.change(super().sample(stream, iteration, indices, support, query), iteration)
