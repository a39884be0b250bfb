"""The SLURM batch scripts on a real one-node cluster that the tests start on this machine.

The fixture runs its own munged, slurmctld and slurmd (as root, from a config written into a
temporary directory, on free ports, with its own munge socket and key) so it touches no system
SLURM set-up and two test sessions on one machine do not collide. CI installs the daemons with
`apt-get install -y slurm-wlm munge`; without them, or without root, these tests skip.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distmaml.run.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from conftest import REPO

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "srun", "scontrol", "scancel", "sinfo")
COMMON = ["configs/sine_debug.yaml", "train.meta_batch=5", "inner.steps=1", "eval.at_end=false",
          "logging.progress=false", "train.log_every=10", "train.checkpoint_every=0"]
# Long enough that the signal (batch shell -> scancel -> slurmd -> trainers, up to a second or so)
# surely lands mid-run even on a fast machine.
ITERATIONS = 300


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Cluster:
    """A running one-node SLURM cluster: its config file and the environment its clients need."""

    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.daemons: list[subprocess.Popen] = []
        path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
        # sbatch passes this environment on to the job (--export=ALL), srun and the trainers.
        self.env = {**clean, "SLURM_CONF": str(self.conf), "PATH": path, "PYTHONPATH": str(REPO),
                    "PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}

    def start(self):
        node = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout.splitlines()[0]
        host = node.split()[0].removeprefix("NodeName=")
        try:
            socket.gethostbyname(host)  # the trainers meet at the first node's name
        except OSError:
            pytest.skip(f"this machine's host name {host!r} does not resolve; SLURM's node name must")
        key = self.root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o600)
        sock = self.root / "munge.sock"
        (self.root / "state").mkdir()
        (self.root / "spool").mkdir()
        r = self.root
        self.conf.write_text(f"""\
ClusterName=distmaml-test
# Each pytest-xdist worker may start its own cluster: distinct job ids keep their jobs' rendezvous
# ports (slurm/train_multi_node.sbatch: 29400 + job id mod 1000) apart.
FirstJobId={first_job_id()}
SlurmctldHost={host}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={sock},cred_expire=5
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/slurmctld.log
SlurmdLogFile={r}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
ReturnToService=2
SchedulerParameters=sched_interval=1
{node} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
""")
        # Foreground daemons are children of this process, so teardown can stop exactly them.
        self.daemons.append(self._daemon(["munged", "--foreground", "--force", f"--socket={sock}",
                                          f"--key-file={key}", f"--pid-file={r}/munged.pid",
                                          f"--log-file={r}/munged.log", f"--seed-file={r}/munged.seed"]))
        self._wait_for(sock.exists, "munged", r / "munged.log")
        self.daemons.append(self._daemon(["slurmctld", "-D", "-i", "-f", str(self.conf)]))
        self.daemons.append(self._daemon(["slurmd", "-D", "-f", str(self.conf)]))
        self._wait_for(lambda: self.client(["sinfo", "-h", "-o", "%T"], check=False).stdout.strip() == "idle",
                       "slurmctld and slurmd", r / "slurmctld.log")

    def _daemon(self, cmd):
        log = open(self.root / f"{cmd[0]}.stdout", "w")
        return subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT)

    def _wait_for(self, ready, what, log, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ready():
                return
            dead = [p.args[0] for p in self.daemons if p.poll() is not None]
            if dead:
                break
            time.sleep(0.3)
        text = log.read_text()[-3000:] if log.exists() else "(no log)"
        raise RuntimeError(f"{what} did not come up (exited: {dead or 'none'}); {log}:\n{text}")

    def client(self, cmd, check=True):
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check, timeout=60)

    def submit(self, script, options, args, **env):
        """sbatch slurm/<script> with sbatch `options` and `args` for distmaml train; the job id."""
        out = subprocess.run(["sbatch", "--parsable", *options, str(REPO / "slurm" / script), *args], cwd=REPO,
                             env={**self.env, **env}, capture_output=True, text=True, check=True).stdout
        return out.strip().split(";")[0]

    def job(self, job_id):
        """scontrol's fields of a job, e.g. {'JobState': 'RUNNING', 'Restarts': '0', ...}."""
        line = self.client(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(field.split("=", 1) for field in line.split() if "=" in field)

    def wait(self, job_id, timeout=300):
        """Wait for the job to end (like `sbatch --wait`, which polls only every 2..32 s); its fields."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            fields = self.job(job_id)
            if fields["JobState"] in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"):
                return fields
            time.sleep(0.5)
        raise AssertionError(f"job {job_id} still {self.job(job_id)['JobState']} after {timeout} s")

    def stop(self):
        self.client(["scancel", "--full", "--user=root"], check=False)
        for proc in reversed(self.daemons):
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def first_job_id() -> int:
    """1 for the main process or worker gw0, 101 for gw1, ...: job ids no other worker's cluster uses."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return 1 + 100 * int(worker.removeprefix("gw") or 0)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [name for name in DAEMONS + CLIENTS if shutil.which(name) is None]
    if missing:
        pytest.skip(f"SLURM is not installed ({', '.join(missing)} missing; apt-get install slurm-wlm munge)")
    if os.geteuid() != 0:
        pytest.skip("starting slurmd (which runs jobs as their users) needs root")
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def final_weights(run_dir):
    return load_checkpoint(list_checkpoints(Path(run_dir) / "checkpoints")[-1])


def output_of(workdir, job_id):
    return (Path(workdir) / f"slurm-distmaml-{job_id}.out").read_text()


@pytest.fixture(scope="module")
def multi_node_run(cluster, tmp_path_factory):
    """slurm/train_multi_node.sbatch on this one node: srun starts one torchrun, which starts 2 workers."""
    workdir = tmp_path_factory.mktemp("multi")
    job_id = cluster.submit("train_multi_node.sbatch", ["--nodes=1", f"--output={workdir}/slurm-distmaml-%j.out"],
                            [*COMMON, f"run.dir={workdir / 'run'}", f"train.iterations={ITERATIONS}"], NPROC="2")
    return workdir, job_id, cluster.wait(job_id)


@pytest.mark.slow
def test_multi_node_script_runs_torchrun_under_srun(multi_node_run):
    workdir, job_id, fields = multi_node_run
    log = output_of(workdir, job_id)
    assert fields["JobState"] == "COMPLETED", log
    assert "rendezvous" in log and "2 process(es), tasks 0..2 of 5" in log, log
    run_dir = workdir / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == {**summary, "status": "complete", "iteration": ITERATIONS, "world_size": 2}
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == [f"ckpt_{ITERATIONS:08d}.pt"]
    logged = [json.loads(line)["iteration"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(10, ITERATIONS + 1, 10))


PREEMPTED = {  # script -> (sbatch options, extra environment)
    "train_single_node.sbatch": (["--ntasks-per-node=2"], {}),  # srun starts the trainers (SLURM_PROCID)
    "train_multi_node.sbatch": (["--nodes=1"], {"NPROC": "2"}),  # srun starts torchrun, torchrun the trainers
}


@pytest.mark.slow
@pytest.mark.parametrize("script", PREEMPTED)
def test_preempted_job_checkpoints_requeues_and_resumes_to_the_same_weights(cluster, multi_node_run, tmp_path,
                                                                            script):
    """USR1 to the batch script mid-run, as --signal=B:USR1@120 sends it before a time limit.

    The script forwards it, the trainers checkpoint and exit, the script requeues the job, and the
    requeued job resumes and ends with the weights of the uninterrupted 2-process run, bit for bit.
    """
    options, env = PREEMPTED[script]
    run_dir = tmp_path / "run"
    job_id = cluster.submit(script, [*options, f"--output={tmp_path}/slurm-distmaml-%j.out"],
                            [*COMMON, f"run.dir={run_dir}", f"train.iterations={ITERATIONS}"], **env)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and metrics.read_text().strip()):  # past iteration 10
        assert time.monotonic() < deadline and cluster.job(job_id)["JobState"] in ("PENDING", "RUNNING"), \
            output_of(tmp_path, job_id)
        time.sleep(0.2)
    cluster.client(["scancel", "--signal=USR1", "--batch", job_id])  # the batch shell only, like B:USR1
    fields = cluster.wait(job_id)
    log = output_of(tmp_path, job_id)
    assert fields["JobState"] == "COMPLETED" and fields["Restarts"] == "1", log
    assert "got SIGUSR1" in log and "requeueing job" in log and "(restart 1)" in log, log
    stops = [line for line in log.splitlines() if "stopped at iteration" in line]
    assert len(stops) == 2, log  # both ranks, at the same iteration
    stop = int(stops[0].split("stopped at iteration ")[1].split()[0])
    assert all(f"stopped at iteration {stop} " in line for line in stops) and 10 <= stop < ITERATIONS, log
    assert f"resuming from {checkpoint_path(run_dir / 'checkpoints', stop)}" in log, log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary == {**summary, "status": "complete", "iteration": ITERATIONS, "world_size": 2}
    straight = final_weights(multi_node_run[0] / "run")
    resumed = final_weights(run_dir)
    assert straight["iteration"] == resumed["iteration"] == ITERATIONS
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
