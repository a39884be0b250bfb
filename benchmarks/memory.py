"""Peak memory and time of one meta-iteration against the number of inner steps K.

    PYTHONPATH=$PWD python benchmarks/memory.py                    # CPU, every K and mode (minutes)
    PYTHONPATH=$PWD python benchmarks/memory.py --device cuda      # on a GPU
    PYTHONPATH=$PWD python benchmarks/memory.py --steps 5 20 --repeats 1

Each configuration runs in a fresh subprocess, so no allocator cache or earlier peak leaks into the
next. A meta-iteration is one batched `meta_gradient` (inner loop, query loss, meta-backward) on the
sine MLP widened to 1 -> 256 -> 256 -> 1, so that the unrolled graph dominates memory.

Memory. CPU: peak resident set size (resource.getrusage ru_maxrss) after the first meta-iteration,
minus the resident set size just before it; the peak is reset first where Linux allows it
(/proc/self/clear_refs), so that imports cannot set it. glibc's malloc keeps freed blocks in its heap
once its mmap threshold has adapted, so RSS also counts fragmentation that grows with K (first-order:
+49 MiB at K=5, +341 MiB at K=100); children therefore run with MALLOC_MMAP_THRESHOLD_=65536, which
returns large blocks to the system at once and makes RSS follow live tensors (first-order: +26 and +30
MiB); --system-malloc measures the default behaviour instead. CUDA: torch.cuda.max_memory_allocated minus
memory_allocated before the iteration (the caching allocator's reserve is not counted).
Time: median over `--repeats` meta-iterations after the first (which also warms up), as wall-clock
seconds and, on CPU, as this process's CPU seconds (with --threads 1, much less disturbed than wall
time when other programs share the cores).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

# (mode, checkpoint) pairs measured for every K; truncated uses --truncate differentiated steps.
SETTINGS = [("second_order", "none"), ("second_order", "every_step"), ("second_order", "auto"),
            ("truncated", "none"), ("truncated", "auto"), ("first_order", "none"), ("implicit", "none")]
# iMAML's solver settings for the implicit rows (lam as in configs/sine_imaml.yaml's range, 5 CG steps).
IMPLICIT = {"lam": 1.0, "cg_steps": 5}


def resident_mib() -> float:
    """Current resident set size of this process (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return peak_resident_mib()


def peak_resident_mib() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def reset_peak_resident() -> bool:
    """Lower the recorded peak RSS to the current RSS (Linux >= 4.0); False where not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def measure(args) -> dict:
    """One configuration, in this process: memory of the first meta-iteration, then timing."""
    import torch

    from distmaml.meta import meta_gradient
    from distmaml.models import MLP
    from distmaml.tasks.sine import SineTasks

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model = MLP(1, (args.hidden, args.hidden), 1).to(device, dtype)
    params = {name: value.detach().clone().requires_grad_() for name, value in model.named_parameters()}
    tasks = SineTasks(support=args.points, query=args.points, device=device, dtype=dtype)
    batch = tasks.sample(0, 0, torch.arange(args.meta_batch, device=device))
    truncate = min(args.truncate, args.k) if args.mode == "truncated" else None

    def iteration(inner_steps: int = args.k, task_batch=batch) -> None:
        meta_gradient(model, params, task_batch, args.inner_lr, inner_steps, args.mode,
                      None if truncate is None else min(truncate, inner_steps), checkpoint=args.checkpoint,
                      implicit=IMPLICIT if args.mode == "implicit" else None)
        if device.type == "cuda":
            torch.cuda.synchronize()

    # A one-task, one-step iteration loads torch.func's lazily initialised machinery (and starts
    # the thread pool) before the baseline, so that it is not counted as memory of the unroll.
    iteration(min(args.k, 1), tasks.sample(0, 0, torch.arange(1, device=device)))

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        baseline = torch.cuda.memory_allocated() / 2**20
    else:
        peak_was_reset = reset_peak_resident()
        baseline = resident_mib()
    start = time.perf_counter()
    iteration()
    first_seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = peak_resident_mib()

    seconds, cpu_seconds = [], []
    for _ in range(args.repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        iteration()
        seconds.append(time.perf_counter() - start)
        cpu_seconds.append(time.process_time() - start_cpu)
    return {"k": args.k, "mode": args.mode, "checkpoint": args.checkpoint, "truncate": truncate,
            "baseline_mib": baseline, "peak_mib": peak, "delta_mib": peak - baseline,
            "seconds": statistics.median(seconds) if seconds else first_seconds,
            "cpu_seconds": statistics.median(cpu_seconds) if cpu_seconds else None,
            "peak_reset": device.type == "cuda" or peak_was_reset}


def table(rows: list[dict], device: str) -> str:
    """Markdown table; checkpointed rows also give memory and time relative to checkpoint=none."""
    unchecked = {row["k"]: row for row in rows if row["mode"] == "second_order" and row["checkpoint"] == "none"}
    on_cpu = not device.startswith("cuda")
    what = "RSS" if on_cpu else "allocated"
    time_columns = ["wall s / iter", "CPU s / iter"] if on_cpu else ["s / iter"]
    header = ["K", "mode", "checkpoint", f"peak - baseline {what} (MiB)", f"peak {what} (MiB)", *time_columns,
              "memory vs none", "time vs none"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---:" if i not in (1, 2) else "---"
                                                        for i in range(len(header))) + "|"]
    for row in rows:
        mode = f"truncated (T={row['truncate']})" if row["mode"] == "truncated" else row["mode"]
        # Compare CPU time where there is one: it is what contention for the cores disturbs least.
        cost = "cpu_seconds" if on_cpu and row.get("cpu_seconds") is not None else "seconds"
        ratios = ["", ""]
        reference = unchecked.get(row["k"])
        if row["mode"] == "second_order" and row["checkpoint"] != "none" and reference:
            ratios = [f"{row['delta_mib'] / reference['delta_mib']:.2f}", f"{row[cost] / reference[cost]:.2f}"]
        times = [f"{row['seconds']:.3f}"] + ([f"{row['cpu_seconds']:.3f}" if row.get("cpu_seconds") else ""]
                                             if on_cpu else [])
        cells = [str(row["k"]), mode, row["checkpoint"], f"{row['delta_mib']:.0f}", f"{row['peak_mib']:.0f}",
                 *times, *ratios]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50, 100], help="inner steps K")
    parser.add_argument("--truncate", type=int, default=10, help="truncated mode: differentiated steps T")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--meta-batch", type=int, default=25)
    parser.add_argument("--points", type=int, default=100, help="support and query points per task")
    parser.add_argument("--inner-lr", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=2, help="timed meta-iterations after the first")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads per run (default: torch's choice); 1 avoids OpenMP stalls on a busy machine")
    parser.add_argument("--system-malloc", action="store_true",
                        help="CPU: keep glibc's adaptive mmap threshold (RSS then includes heap fragmentation)")
    parser.add_argument("--json", help="also write the rows to this file")
    parser.add_argument("--modes", nargs="+", default=sorted({mode for mode, _ in SETTINGS}),
                        help="only these modes (second_order, truncated, first_order, implicit)")
    # One configuration in this process (what the parent runs in each subprocess).
    parser.add_argument("--k", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--mode", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.k is not None:
        print(json.dumps(measure(args)))
        return
    common = ["--device", args.device, "--dtype", args.dtype, "--truncate", str(args.truncate),
              "--hidden", str(args.hidden), "--meta-batch", str(args.meta_batch), "--points", str(args.points),
              "--inner-lr", str(args.inner_lr), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    environment = dict(os.environ)
    if not args.system_malloc:
        environment["MALLOC_MMAP_THRESHOLD_"] = str(64 * 1024)
    rows = []
    for k in args.steps:
        for mode, checkpoint in [s for s in SETTINGS if s[0] in args.modes]:
            command = [sys.executable, __file__, *common, "--k", str(k), "--mode", mode,
                       "--checkpoint", checkpoint]
            result = subprocess.run(command, capture_output=True, text=True, env=environment)
            if result.returncode != 0:
                sys.exit(f"{' '.join(command)} failed:\n{result.stderr}")
            rows.append(json.loads(result.stdout.strip().splitlines()[-1]))
            print(f"K={k} {mode} checkpoint={checkpoint}: +{rows[-1]['delta_mib']:.0f} MiB, "
                  f"{rows[-1]['seconds']:.3f} s", file=sys.stderr, flush=True)
    if not all(row["peak_reset"] for row in rows):
        print("note: the peak RSS could not be reset; peaks include everything before the iteration",
              file=sys.stderr)
    threads = f", {args.threads} CPU thread(s)" if args.threads and args.device == "cpu" else ""
    if args.device == "cpu":
        threads += ", system malloc" if args.system_malloc else ", MALLOC_MMAP_THRESHOLD_=65536"
    print(f"device {args.device}{threads}, {args.dtype}, MLP 1-{args.hidden}-{args.hidden}-1, "
          f"meta-batch {args.meta_batch}, {args.points} support + {args.points} query points, "
          f"truncate T={args.truncate}\n")
    print(table(rows, args.device))
    if args.json:
        with open(args.json, "w") as out:
            json.dump(rows, out, indent=1)


if __name__ == "__main__":
    main()
