"""Several processes: launch-environment parsing, sharding, the collectives, and whole runs under
torchrun and accelerate (gloo on the CPU) against one process, preemption and a killed worker.

The 2-process runs share one reference run (module fixture) because every launcher start costs
seconds. Same world size means the same sums in the same order, so those comparisons are bitwise;
one process against two adds the shards in another order, so that comparison has a tolerance.
"""

import json
import math
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distmaml.engine import dist
from distmaml.run.checkpoint import checkpoint_path, list_checkpoints, load_checkpoint
from conftest import REPO

# ---------------------------------------------------------------------------------------- units


@pytest.mark.parametrize("nodelist, host", [("gpu[07-09,12],cpu3", "gpu07"), ("node1", "node1"),
                                            ("a-b[001-004]", "a-b001"), ("n[3,1-2]", "n3"),
                                            ("login2,compute[10-11]", "login2"), (" c[5] ", "c5")])
def test_first_host_of_slurm_node_lists(nodelist, host):
    assert dist.first_host(nodelist) == host


def test_read_launch_env_prefers_torchrun_then_srun_step():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "n1", "MASTER_PORT": "29500",
                "SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "2"}  # torchrun started by srun: torchrun wins
    assert dist.read_launch_env(torchrun) == dist.LaunchEnv(3, 8, 1, "n1", "29500", "torchrun")
    srun = {"SLURM_PROCID": "5", "SLURM_NTASKS": "6", "SLURM_STEP_NUM_TASKS": "6", "SLURM_LOCALID": "2",
            "SLURM_JOB_NODELIST": "gpu[07-09,12],cpu3", "SLURM_STEP_NODELIST": "gpu[08-09]", "SLURM_JOB_ID": "123"}
    assert dist.read_launch_env(srun) == dist.LaunchEnv(5, 6, 2, "gpu08", str(15000 + 123), "srun")
    assert dist.read_launch_env({**srun, "MASTER_ADDR": "head", "MASTER_PORT": "4000"}).master_addr == "head"
    # The batch shell of a 2-task job has SLURM_PROCID=0 and SLURM_NTASKS=2 but is no step: run alone.
    assert dist.read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "n1"}) is None
    assert dist.read_launch_env({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "1"}) is None
    assert dist.read_launch_env({}) is None


@pytest.mark.parametrize("meta_batch, world", [(5, 2), (25, 4), (7, 7), (3, 5), (0, 2), (64, 8)])
def test_shards_are_contiguous_cover_every_task_once_and_differ_by_at_most_one(meta_batch, world):
    shards = [dist.shard(meta_batch, rank, world) for rank in range(world)]
    assert [i for s in shards for i in s] == list(range(meta_batch))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes, reverse=True)


def test_uneven_and_empty_shards_exactly():
    assert [dist.shard(5, r, 2) for r in range(2)] == [range(0, 3), range(3, 5)]
    assert [len(dist.shard(3, r, 5)) for r in range(5)] == [1, 1, 1, 0, 0]  # world > B: idle ranks


# ------------------------------------------------------------------------------ process helpers


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env(**extra):
    # The launchers call `torchrun` / `accelerate` by name: find the ones next to this interpreter.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "RANK", "WORLD_SIZE", "MASTER_"))}
    return {**clean, "PATH": path, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


COMMON = ["configs/sine_debug.yaml", "train.meta_batch=5", "inner.steps=1", "eval.at_end=false",
          "logging.progress=false", "train.log_every=10", "train.check_every=10", "train.keep_checkpoints=20"]
ITERATIONS = 120  # the 2-process runs; the reference checkpoints every 20
# One process against two: float32 rounding differences grow with iterations, so that comparison
# stops early. The learning rate is constant, so the first COMPARED iterations
# of a longer run are a COMPARED-iteration run.
COMPARED = 20


def torchrun_cmd(run_dir, *overrides):
    return ["bash", str(REPO / "launch/torchrun.sh"), *COMMON, f"run.dir={run_dir}", *overrides]


STARTED: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def _no_leftover_processes():
    yield
    while STARTED:  # a launcher a failed test left running, with its workers
        proc = STARTED.pop()
        if proc.poll() is None:
            kill_tree(proc)


def start(cmd, **env):
    proc = subprocess.Popen(cmd, cwd=REPO, env=launch_env(**env), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    STARTED.append(proc)
    return proc


def process_tree(pid):
    """`pid` and all its descendants (torchrun starts its workers in sessions of their own)."""
    found = [pid]
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                found += process_tree(int(child))
    except OSError:
        pass
    return found


def kill_tree(proc):
    """SIGKILL a launcher and every process under it; what it printed."""
    for pid in process_tree(proc.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return proc.communicate()[0]


def finish(proc, timeout=240):
    """Wait for a launcher; on a hang kill it and its workers, so no test leaves processes behind."""
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        out = kill_tree(proc)
        raise AssertionError(f"{' '.join(map(str, proc.args))} hung for {timeout} s:\n{out}")
    return proc.returncode, out


def run(cmd, timeout=240, **env):
    code, out = finish(start(cmd, **env), timeout)
    assert code == 0, out
    return out


def weights(run_dir, iteration):
    """Every meta-parameter of a checkpoint: the model's weights and any learned step sizes."""
    state = load_checkpoint(checkpoint_path(Path(run_dir) / "checkpoints", iteration))
    return {**state["model"], **state["rule"]}


def assert_bitwise_equal(a, b):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max().item())


def max_abs_diff(a, b):
    return max((a[name] - b[name]).abs().max().item() for name in a)


def worker_pid(agent_pid, rank, timeout=60):
    """The pid of torchrun's worker `rank` (a child of the agent whose environment says RANK=rank)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{agent_pid}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    environ = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:
                    continue
                if f"RANK={rank}".encode() in environ:
                    return int(child)
        time.sleep(0.1)
    raise AssertionError(f"no worker with RANK={rank} under torchrun pid {agent_pid}")


def read_until(proc, text, transcript):
    """Read the launcher's output until a line contains `text` (keeps everything read)."""
    for line in proc.stdout:
        transcript.append(line)
        if text in line:
            return
    raise AssertionError(f"never saw {text!r}:\n{''.join(transcript)}")


# ----------------------------------------------------------------------------------- collectives

REPLICA_SCRIPT = """
import torch
from distmaml.engine import dist
ctx = dist.init("cpu")
try:
    a, b = dist.all_reduce_sum([torch.full((2, 3), ctx.rank + 1.0), torch.tensor([10.0 * ctx.rank])], ctx)
    assert torch.equal(a, torch.full((2, 3), 3.0)) and torch.equal(b, torch.tensor([10.0])), (a, b)
    params = [torch.linspace(-1, 1, 1640).reshape(40, 41), torch.linspace(0, 1, 40)]
    dist.check_replicas(params, ctx, iteration=5)  # identical replicas pass
    print("identical: passed", flush=True)
    if ctx.rank == 1:  # one rank's weights drift by one float32 ulp in one element
        params[0][3, 7] = torch.nextafter(params[0][3, 7], torch.tensor(2.0))
    try:
        dist.check_replicas(params, ctx, iteration=6)
        print("perturbed: MISSED", flush=True)
    except RuntimeError as err:
        print("perturbed:", err, flush=True)
    if ctx.rank == 1:  # same values, two of them swapped: the plain sum cannot see this
        params[0][3, 7] = torch.linspace(-1, 1, 1640).reshape(40, 41)[3, 7]
        params[1][[0, 1]] = params[1][[1, 0]]
    try:
        dist.check_replicas(params, ctx, iteration=7)
        print("swapped: MISSED", flush=True)
    except RuntimeError as err:
        print("swapped:", err, flush=True)
finally:
    dist.teardown()
"""


def start_two_processes(script: str) -> list[subprocess.Popen]:
    """`script` started by two processes joined from torchrun-style environment variables."""
    port = str(free_port())
    return [subprocess.Popen([sys.executable, "-c", script], cwd=REPO, text=True, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT,
                             env=launch_env(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank),
                                            MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
            for rank in range(2)]


def two_gloo_processes(script: str) -> list[str]:
    """`script` run by two processes; what each printed, once both exited successfully."""
    procs = start_two_processes(script)
    outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out
    return outputs


def test_all_reduce_and_replica_check_detect_a_diverged_rank():
    for out in two_gloo_processes(REPLICA_SCRIPT):
        assert "identical: passed" in out, out
        # Every rank raises (not only rank 0), naming the diverged rank and the iteration.
        assert "perturbed: iteration 6: weights of rank(s) [1] diverged from rank 0's" in out, out
        assert "swapped: iteration 7: weights of rank(s) [1] diverged" in out, out


PATH_SCRIPT = """
import torch
from distmaml.build import build
from distmaml.config import load_config
from distmaml.engine import dist, preflight
ctx = dist.init("cpu")
try:
    config = load_config("configs/sine_debug.yaml", ["engine.batched=auto", "train.meta_batch=4"])
    # Alone, rank 0 would take the loop (1 s against 2 s); summed with rank 1's, the batched path wins.
    planted = {0: {True: 2.0, False: 1.0}, 1: {True: 0.5, False: 3.0}}[ctx.rank]
    preflight.probe_seconds = lambda learner, batch, inner, batched, device: planted[batched]
    print("batched:", preflight.choose_path(config, ctx, build(config), None), flush=True)
finally:
    dist.teardown()
"""


def test_every_process_takes_the_path_their_summed_probes_choose():
    """engine.batched = auto: the ranks decide together, so that none runs a path the others do not."""
    assert all("batched: True" in out for out in two_gloo_processes(PATH_SCRIPT))


WAIT_SCRIPT = """
import time
from distmaml.engine import dist
ctx = dist.init("cpu", timeout_s=8.0)  # room for the two processes to start apart
try:
    if ctx.is_main:
        time.sleep(12.0)  # the final evaluation, longer than dist.timeout
    dist.wait_for_main(ctx)
    print("waited", flush=True)
finally:
    dist.teardown()
"""


def test_ranks_wait_for_the_main_process_evaluation_beyond_the_collective_timeout():
    assert all("waited" in out for out in two_gloo_processes(WAIT_SCRIPT))


# ----------------------------------------------------------------------------- runs end to end


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 2-process torchrun run (second order) with checkpoints every 20 iterations."""
    run_dir = tmp_path_factory.mktemp("reference")
    out = run(torchrun_cmd(run_dir, f"train.iterations={ITERATIONS}", "train.checkpoint_every=20"), NPROC="2")
    assert "2 process(es), tasks 0..2 of 5" in out, out
    return run_dir


def metrics(run_dir):
    return {m["iteration"]: m for m in map(json.loads, (Path(run_dir) / "metrics.jsonl").read_text().splitlines())}


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["second_order", "first_order", "implicit", "meta_sgd"])
def test_two_processes_match_one(tmp_path, reference, mode):
    """B = 5 over 2 ranks (3 + 2 tasks): the same weights (and learned step sizes) and logged metrics
    as one process."""
    setting = ["inner.rule=meta_sgd", "inner.steps=2"] if mode == "meta_sgd" else [f"inner.mode={mode}"]
    overrides = [*setting, f"train.iterations={COMPARED}", "train.checkpoint_every=0"]
    if mode == "implicit":
        # iMAML: the proximal term makes the inner solution depend on theta. CG's stopping test
        # (residual below cg_tol) can flip on a float32 rounding difference between shardings and
        # amplify it; in float64 the shards add up to the last bits.
        overrides += ["maml.proximal=1.0", "engine.dtype=float64"]
    one = tmp_path / "one"
    run([sys.executable, "-m", "distmaml", "train", *COMMON, f"run.dir={one}", *overrides])
    two = reference
    if mode != "second_order":  # the reference run is second order
        two = tmp_path / "two"
        run(torchrun_cmd(two, *overrides), NPROC="2")
    assert weights(one, COMPARED).keys() == weights(two, COMPARED).keys()
    if mode == "meta_sgd":
        assert len(weights(one, COMPARED)) == 12  # six weights, six learned step-size tensors
    assert max_abs_diff(weights(one, COMPARED), weights(two, COMPARED)) <= 1e-6
    # Logged metrics are reduced over ranks before rank 0 writes them: they describe all 5 tasks.
    for iteration, logged in metrics(one).items():
        for key in ("meta_loss", "query_loss_before", "query_loss_after", "grad_norm"):
            assert logged[key] == pytest.approx(metrics(two)[iteration][key], rel=1e-5), (iteration, key)


@pytest.mark.slow
@pytest.mark.parametrize("problem, methods, name, initial", [
    ("decay", ["finite_difference", "implicit", "neumann", "second_order", "truncated"], "log_decay.net.0.weight",
     0.01),
    ("learning_rate", ["finite_difference", "first_order", "second_order", "truncated"], "inner.lr.log_schedule",
     0.3),
    ("distill", ["second_order", "truncated"], "synthetic.label_logits", None),
])
def test_every_method_on_random_initialisations_gives_two_processes_the_one_process_result(tmp_path, problem,
                                                                                            methods, name, initial):
    """Tasks that are random initialisations (and mini-batch orders): each task's start is a function
    of its global index, so 2 ranks (3 + 2 tasks) reach one process's meta-parameters after 3 outer
    steps, whichever method differentiates them."""
    worker = str(REPO / "tests/engine/methods_worker.py")
    run([sys.executable, worker, problem, str(tmp_path / "one.pt")])
    run(["torchrun", "--standalone", "--nproc-per-node", "2", worker, problem, str(tmp_path / "two.pt")],
        TORCH_DISABLE_SHARE_RDZV_TCP_STORE="1")
    one, two = torch.load(tmp_path / "one.pt"), torch.load(tmp_path / "two.pt")
    assert sorted(one) == sorted(two) == methods
    for method in one:
        assert max_abs_diff(one[method], two[method]) <= 1e-6, method
        # Three Adam steps of 0.1 moved the meta-parameters (a method returning zeros would not).
        start = 5.0 * torch.eye(10, dtype=torch.float64) if initial is None else math.log(initial)
        assert (one[method][name] - start).abs().max() > 0.05, method


@pytest.mark.slow
def test_two_processes_with_checkpointed_unrolls_match_the_stored_graph(tmp_path):
    """inner.checkpoint under the all-reduce: recomputing segments changes nothing, bit for bit."""
    overrides = ["inner.steps=6", f"train.iterations={COMPARED}", "train.checkpoint_every=0"]
    run(torchrun_cmd(tmp_path / "stored", *overrides), NPROC="2")
    run(torchrun_cmd(tmp_path / "recomputed", *overrides, "inner.checkpoint=auto"), NPROC="2")
    assert_bitwise_equal(weights(tmp_path / "stored", COMPARED), weights(tmp_path / "recomputed", COMPARED))


@pytest.mark.slow
def test_accelerate_launch_matches_torchrun(tmp_path, reference):
    """`accelerate launch --multi_gpu --num_processes 2` on a machine without GPUs: 2 gloo processes."""
    out = run(["bash", str(REPO / "launch/accelerate.sh"), *COMMON, f"run.dir={tmp_path}",
               f"train.iterations={COMPARED}"], NPROC="2", MAIN_PROCESS_PORT=str(free_port()))
    assert "2 process(es), tasks 0..2 of 5 on this one (cpu, " in out, out
    assert_bitwise_equal(weights(tmp_path, COMPARED), weights(reference, COMPARED))


@pytest.mark.slow
def test_preempted_two_process_run_resumes_to_the_same_weights(tmp_path, reference):
    """Stop twice, as SLURM would, and resume each time: the result is bitwise the uninterrupted run.

    First SIGUSR1 reaches only rank 1 (a signal to one task): the stop request rides in the
    all-reduce, so both ranks stop after the same iteration. Then SIGTERM to the torchrun agent, as
    slurm/*.sbatch send it: torchrun passes it on to every worker.
    """
    cmd = torchrun_cmd(tmp_path, f"train.iterations={ITERATIONS}", "train.checkpoint_every=0")
    transcript = []
    proc = start(cmd, NPROC="2")
    read_until(proc, "iter 20 ", transcript)
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGUSR1)
    code, out = finish(proc)
    transcript.append(out)
    stops = [line for line in out.splitlines() if "stopped at iteration" in line]
    assert len(stops) == 2 and any("[rank 1]" in line for line in stops), "".join(transcript)
    first_stop = int(stops[0].split("stopped at iteration ")[1].split()[0])
    assert all(f"stopped at iteration {first_stop} " in line for line in stops)
    assert code != 0 and re.search(r"exitcode\s*:\s*138", out), out  # 128 + SIGUSR1, as torchrun reports it
    assert [p.name for p in list_checkpoints(tmp_path / "checkpoints")] == [f"ckpt_{first_stop:08d}.pt"]
    assert 20 <= first_stop < ITERATIONS
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "preempted"

    transcript = []
    proc = start(cmd, NPROC="2")
    read_until(proc, f"resuming from {checkpoint_path(tmp_path / 'checkpoints', first_stop)}", transcript)
    read_until(proc, f"iter {first_stop // 10 * 10 + 20} ", transcript)
    proc.send_signal(signal.SIGTERM)  # the agent
    code, out = finish(proc)
    stops = [line for line in out.splitlines() if "stopped at iteration" in line]
    assert len(stops) == 2 and "received SIGTERM" in out, "".join(transcript) + out
    second_stop = int(stops[0].split("stopped at iteration ")[1].split()[0])
    assert first_stop < second_stop < ITERATIONS

    out = run(cmd, NPROC="2")
    assert f"resuming from {checkpoint_path(tmp_path / 'checkpoints', second_stop)}" in out
    assert_bitwise_equal(weights(tmp_path, ITERATIONS), weights(reference, ITERATIONS))
    assert json.loads((tmp_path / "summary.json").read_text())["status"] == "complete"


@pytest.mark.slow
def test_killed_worker_is_restarted_by_torchrun_and_resumes(tmp_path, reference):
    """SIGKILL one worker after a checkpoint: torchrun --max-restarts restarts both, they resume."""
    proc = start(torchrun_cmd(tmp_path, f"train.iterations={ITERATIONS}", "train.checkpoint_every=20"),
                 NPROC="2", MAX_RESTARTS="2")
    transcript = []
    read_until(proc, "iter 30 ", transcript)  # ckpt 20 is complete (saving ends in a barrier)
    victim = worker_pid(proc.pid, rank=1)
    os.kill(victim, signal.SIGKILL)
    code, out = finish(proc)
    out = "".join(transcript) + out
    assert code == 0, out
    assert "resuming from" in out, out  # the restarted workers picked up a checkpoint
    resumed_at = int(out.split("resuming from ")[1].split("(iteration ")[1].split(")")[0])
    assert 20 <= resumed_at < ITERATIONS
    assert_bitwise_equal(weights(tmp_path, ITERATIONS), weights(reference, ITERATIONS))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary == {**summary, "status": "complete", "iteration": ITERATIONS, "world_size": 2}


# ------------------------------------------------------------------------- faults between ranks


@pytest.mark.slow
def test_a_stopped_rank_is_reported_then_fails_the_run_after_dist_timeout(tmp_path):
    """SIGSTOP one worker: rank 0 says so while it waits, then the collective times out in one line."""
    proc = start(torchrun_cmd(tmp_path, "train.iterations=100000", "train.checkpoint_every=0", "dist.timeout=12"),
                 NPROC="2")
    transcript = []
    read_until(proc, "iter 20 ", transcript)
    victim = worker_pid(proc.pid, rank=1)
    os.kill(victim, signal.SIGSTOP)
    try:
        read_until(proc, "no iteration has finished for", transcript)
        read_until(proc, "distmaml train: error: rank 0", transcript)
    finally:  # rank 0 has said its piece: no need to wait for torchrun to give up on the stopped one
        for pid in process_tree(victim):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    code, out = finish(proc, timeout=120)
    out = "".join(transcript) + out
    assert code != 0
    waiting = [line for line in out.splitlines() if "no iteration has finished for" in line]
    assert waiting and "the collective fails after dist.timeout = 12 s" in waiting[0]
    errors = [line for line in out.splitlines() if "distmaml train: error: rank 0: a collective" in line]
    assert errors and "dist.timeout = 12 s" in errors[0], out
    assert "Traceback" not in out.split("no iteration has finished for")[1].split("distmaml train: error")[0]


EXIT_SCRIPT = """
import sys, torch
from distmaml.engine import dist
from distmaml.run.signals import PreemptionWatch
with PreemptionWatch():  # the trainer's signal thread and watchdog, started and joined as it does
    ctx = dist.init("cpu", timeout_s=60)
    with dist.Watchdog(ctx, 60) as watchdog:
        dist.on_every_rank(ctx, lambda: None)
        for iteration in range(3):
            (total,) = dist.all_reduce_sum([torch.full((1000,), float(ctx.rank))], ctx)
            watchdog.beat(iteration)
    assert total[0].item() == 1.0
    dist.teardown()
print("clean", flush=True)
"""


@pytest.mark.slow
def test_distributed_runs_exit_normally_every_time(tmp_path):
    """12 distributed process exits (6 two-rank groups) through the interpreter's normal shutdown,
    with the trainer's threads and teardown: none may abort ("terminate called without an active
    exception") or exit non-zero. (Every torchrun test above ends in such exits too.)"""
    for attempt in range(6):
        procs = start_two_processes(EXIT_SCRIPT)
        for proc in procs:
            out = proc.communicate(timeout=120)[0]
            assert proc.returncode == 0 and "clean" in out, out
            assert "terminate called" not in out and "Traceback" not in out, out


@pytest.mark.slow
def test_a_rank_without_tasks_joins_every_collective(tmp_path):
    """Meta-batch 1 on 2 ranks (implicit mode, whose log step also reduces CG statistics): the idle
    rank must send the same buffers as the busy one, or the run hangs."""
    overrides = ["train.meta_batch=1", "inner.mode=implicit", "maml.proximal=1.0", "inner.steps=2",
                 "train.iterations=10",
                 "train.log_every=5", "train.checkpoint_every=0"]
    run([sys.executable, "-m", "distmaml", "train", *COMMON, *overrides, f"run.dir={tmp_path / 'one'}"])
    run(torchrun_cmd(tmp_path / "two", *overrides), NPROC="2")
    assert max_abs_diff(weights(tmp_path / "one", 10), weights(tmp_path / "two", 10)) <= 1e-6
    assert metrics(tmp_path / "two")[10]["cg_steps"] == pytest.approx(metrics(tmp_path / "one")[10]["cg_steps"])
