"""Memory and time of one meta-iteration: implicit (iMAML) against second-order MAML, over K.

    PYTHONPATH=$PWD python benchmarks/implicit_memory.py                 # CPU, the table in the report
    PYTHONPATH=$PWD python benchmarks/implicit_memory.py --device cuda   # GPU: peak allocated memory
    PYTHONPATH=$PWD python benchmarks/implicit_memory.py --cg-only       # batched vs per-task CG, HVPs

Each (mode, K) runs in a fresh subprocess, so one configuration's peak cannot hide another's. On CPU
the peak is resource.getrusage(RUSAGE_SELF).ru_maxrss after one meta-iteration minus its value once
the model and tasks are built; on CUDA it is torch.cuda.max_memory_allocated minus the memory
allocated before the iteration. The network is the sine MLP widened to 1 -> 256 -> 256 -> 1, with
25 tasks of 100 support and 100 query points, so the per-task weights dominate the memory.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch


def build(args):
    from distmaml.models import MLP
    from distmaml.tasks.sine import SineTasks

    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    model = MLP(1, (args.hidden, args.hidden), 1).to(args.device, dtype)
    params = {name: value.detach().requires_grad_() for name, value in model.named_parameters()}
    tasks = SineTasks(seed=0, support=args.points, query=args.points, device=args.device, dtype=dtype)
    return model, params, tasks


def implicit_settings(args) -> dict:
    return dict(lam=args.lam, cg_steps=args.cg_steps, cg_damping=0.0, cg_tol=0.0)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(args) -> dict:
    """One configuration in this process: peak extra memory of one iteration, then seconds per iteration."""
    from distmaml.meta import meta_gradient

    torch.set_num_threads(args.threads)
    model, params, tasks = build(args)
    batch = tasks.sample(0, 0, torch.arange(args.meta_batch))

    def iteration():
        result = meta_gradient(model, params, batch, args.inner_lr, args.k, mode=args.mode,
                               implicit=implicit_settings(args))
        synchronize(args.device)
        return result

    cuda = args.device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated()
    else:
        baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    iteration()
    if cuda:
        peak_mib = (torch.cuda.max_memory_allocated() - baseline) / 2**20
    else:
        peak_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - baseline) / 1024
    start = time.perf_counter()
    for _ in range(args.repeats):
        iteration()
    return {"mode": args.mode, "k": args.k, "peak_mib": peak_mib,
            "seconds": (time.perf_counter() - start) / args.repeats}


def run_configuration(args, mode: str, k: int) -> dict:
    command = [sys.executable, __file__, "--worker", "--mode", mode, "--k", str(k)]
    for name in ("device", "dtype", "hidden", "meta_batch", "points", "inner_lr", "lam", "cg_steps", "repeats",
                 "threads"):
        command += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        return {"mode": mode, "k": k, "error": done.stderr.strip().splitlines()[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def memory_table(args) -> str:
    results = {(mode, k): run_configuration(args, mode, k) for k in args.ks for mode in args.modes}
    header = "| K | " + " | ".join(f"{mode} peak MiB | {mode} s/iter" for mode in args.modes) + " |"
    lines = [header, "|---" * (1 + 2 * len(args.modes)) + "|"]
    for k in args.ks:
        cells = []
        for mode in args.modes:
            result = results[mode, k]
            if "error" in result:
                cells += [f"failed: {result['error'][:40]}", "-"]
            else:
                cells += [f"{result['peak_mib']:.1f}", f"{result['seconds']:.3f}"]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seconds(function, repeats: int, device: str) -> float:
    function()  # the first call pays one-time dispatch and allocation costs
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        function()
    synchronize(device)
    return (time.perf_counter() - start) / repeats


def cg_table(args) -> str:
    """Batched CG with both Hessian-vector products against the per-task loop, at K = args.cg_k."""
    from distmaml.meta.implicit import implicit_meta_gradient, implicit_meta_gradient_loop

    torch.set_num_threads(args.threads)
    model, params, tasks = build(args)
    batch = tasks.sample(0, 0, torch.arange(args.meta_batch))
    settings = implicit_settings(args)

    def plain_mse(prediction, target):
        # jvp(grad(F.mse_loss)) fails with "ZeroTensors are immutable" (pytorch/pytorch#123996)
        return ((prediction - target) ** 2).mean()

    variants = {
        "batched, double backward (default)": lambda: implicit_meta_gradient(
            model, params, batch, args.inner_lr, args.cg_k, loss_fn=plain_mse, **settings),
        "batched, jvp of grad": lambda: implicit_meta_gradient(
            model, params, batch, args.inner_lr, args.cg_k, loss_fn=plain_mse, hvp="jvp", **settings),
        "per-task loop": lambda: implicit_meta_gradient_loop(
            model, params, batch, args.inner_lr, args.cg_k, loss_fn=plain_mse, **settings),
    }
    lines = ["| variant | s/iter |", "|---|---|"]
    for name, function in variants.items():
        lines.append(f"| {name} | {seconds(function, args.repeats, args.device):.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--cg-only", action="store_true", help="only the batched-vs-loop CG timing")
    parser.add_argument("--mode", default="implicit")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--ks", type=int, nargs="+", default=[5, 10, 20, 50, 100])
    parser.add_argument("--modes", nargs="+", default=["implicit", "second_order"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--meta-batch", type=int, default=25)
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--cg-steps", type=int, default=5)
    parser.add_argument("--cg-k", type=int, default=10, help="inner steps for the CG timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"cpu, {args.threads} thread(s)"
    print(f"# {device}, {args.dtype}, MLP 1-{args.hidden}-{args.hidden}-1, {args.meta_batch} tasks x "
          f"{args.points} points, lam {args.lam}, {args.cg_steps} CG steps\n")
    if not args.cg_only:
        print(memory_table(args) + "\n")
    print(f"CG variants at K = {args.cg_k}:\n")
    print(cg_table(args))


if __name__ == "__main__":
    main()
