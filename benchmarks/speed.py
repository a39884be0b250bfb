"""Milliseconds per meta-iteration of what training runs (MetaStep: sampling, meta-gradient, all-reduce,
clipping, Adam), across tasks, modes, inner rules and engines; and episodes built per second.

    python -m benchmarks.speed                        # this CPU, one thread: the README's CPU tables
    python -m benchmarks.speed --device cuda          # adds the CUDA graph and bf16 rows
    python -m benchmarks.speed --only rules --quick   # a group, shorter windows

Each row is the median over --windows windows (each at least --seconds long) of the time per
meta-iteration, after --warmup iterations. Engines: "loop" is the per-task reference
(engine.batched=false), "batched" the vmap engine, "graph" the batched engine captured as one CUDA
graph, "graph-bf16" that with bfloat16 autocast. Writes JSON (--out) with the machine and every
setting.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch

from benchmarks.common import (MINIIMAGENET_SHAPED, OMNIGLOT_SHAPED, REPO, RESULTS, config_for, machine,
                               median_seconds, meta_step, write)
from distmaml.rng import STREAM_TRAIN

SINE = REPO / "configs/sine_maml.yaml"
OMNIGLOT = REPO / "configs/omniglot_5w1s.yaml"
MINIIMAGENET = REPO / "configs/miniimagenet_5w1s.yaml"

ENGINES = {"loop": ["engine.batched=false"], "batched": [], "graph": ["engine.cuda_graph=true"],
           "graph-bf16": ["engine.cuda_graph=true", "engine.dtype=bf16"]}


def cases(device: str, quick: bool) -> list[dict[str, Any]]:
    """The matrix: (group, task, settings, engines); quick has fewer inner-step counts."""
    gpu = device == "cuda"
    engines = ["loop", "batched", *(["graph", "graph-bf16"] if gpu else [])]
    steps = (1, 5, 10, 50) if gpu and not quick else (1, 5) if quick else (1, 5, 10)
    out = []
    for mode in ("second_order", "first_order"):
        for k in steps:
            batches = (25, 1000) if gpu else (25,)
            for batch in batches:
                out.append(dict(group="sine", task="sine", base=SINE, settings=[f"inner.mode={mode}",
                                f"inner.steps={k}", f"train.meta_batch={batch}"],
                                engines=[e for e in engines if not (e == "loop" and (batch > 25 or k > 10))]))
    rules = {"sgd": [], "meta_sgd": [], "lslr": [], "momentum": ["inner.momentum=0.9"],
             "adam": ["inner.lr=0.001"]}
    for rule, extra in rules.items():
        out.append(dict(group="rules", task="sine", base=SINE, settings=[f"inner.rule={rule}", "inner.steps=5", *extra],
                        engines=["batched", *(["graph"] if gpu else [])]))
    for mode, extra in (("truncated", ["inner.truncate=2"]), ("reptile", ["inner.lr=0.02"]),
                        ("implicit", ["maml.proximal=5.0", "implicit.damping=15.0"])):
        out.append(dict(group="modes", task="sine", base=SINE, settings=[f"inner.mode={mode}", "inner.steps=5", *extra],
                        engines=["batched", *(["graph"] if gpu else [])]))
    for k in (1, 5) if not quick else (1,):
        for adapt in ([], ["inner.adapt=[classifier]"]):
            out.append(dict(group="omniglot", task="omniglot-shaped 5w1s", base=OMNIGLOT,
                            settings=[*OMNIGLOT_SHAPED, f"inner.steps={k}", *adapt],
                            engines=engines if not adapt else ["batched", *(["graph"] if gpu else [])]))
    out.append(dict(group="miniimagenet", task="mini-imagenet-shaped 5w1s", base=MINIIMAGENET,
                    settings=[*MINIIMAGENET_SHAPED, "inner.steps=5"], engines=engines))
    return out


def time_case(case: dict[str, Any], engine: str, device: str, windows: int, seconds: float, warmup: int) -> dict:
    config = config_for(case["base"], [*case["settings"], *ENGINES[engine], f"engine.device={device}"])
    step, _ = meta_step(config, device)
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    counter = iter(range(10 ** 9))
    for _ in range(warmup):
        step(next(counter))
    per_iteration = median_seconds(lambda: step(next(counter)), windows, seconds, sync)
    return {"group": case["group"], "task": case["task"], "engine": engine, "settings": case["settings"],
            "mode": config.inner.mode, "rule": config.inner.rule, "inner_steps": config.inner.steps,
            "meta_batch": config.train.meta_batch, "adapt": config.inner.adapt,
            "ms_per_iteration": 1e3 * per_iteration, "tasks_per_s": config.train.meta_batch / per_iteration}


def episodes(device: str, seconds: float, windows: int) -> list[dict[str, Any]]:
    """Images per second delivered as episodes: gathered on the device from the uint8 array, against a
    CPU data loader (2 worker processes assembling the same episodes from the same array)."""
    config = config_for(MINIIMAGENET, [*MINIIMAGENET_SHAPED, f"engine.device={device}"])
    _, learner = meta_step(config, device)
    family, batch = learner.family, config.train.meta_batch
    per_episode = batch * config.task.ways * (config.task.support + config.task.query)
    sync = (lambda: torch.cuda.synchronize()) if device == "cuda" else (lambda: None)
    counter = iter(range(10 ** 9))
    indices = torch.arange(batch, device=device)
    on_device = median_seconds(lambda: family.sample(STREAM_TRAIN, next(counter), indices), windows, seconds, sync)
    loader = torch.utils.data.DataLoader(_Episodes(family, batch), batch_size=None, num_workers=2,
                                         persistent_workers=True, prefetch_factor=4)
    stream = iter(loader)
    next(stream)

    def from_loader():
        x, y, qx, qy = next(stream)
        if device == "cuda":
            x.to(device, non_blocking=True), qx.to(device, non_blocking=True)

    via_loader = median_seconds(from_loader, windows, seconds, sync)
    return [{"group": "episodes", "source": "on the device (uint8 array, gather)", "device": device,
             "images_per_episode_batch": per_episode, "images_per_s": per_episode / on_device},
            {"group": "episodes", "source": "CPU DataLoader, 2 workers", "device": device,
             "images_per_episode_batch": per_episode, "images_per_s": per_episode / via_loader}]


class _Episodes(torch.utils.data.IterableDataset):
    """A conventional loader: episodes assembled with numpy on the host from the same uint8 images."""

    def __init__(self, family, batch: int):
        split = family._splits["train"]
        self.images = split.images.cpu().numpy()
        self.start, self.count = split.start.cpu().numpy(), split.count.cpu().numpy()
        self.ways, self.support, self.query, self.batch = family.ways, family.support, family.query, batch

    def __iter__(self):
        rng = np.random.default_rng(torch.utils.data.get_worker_info().id if torch.utils.data.get_worker_info() else 0)
        while True:
            support, query = [], []
            for _ in range(self.batch):
                classes = rng.choice(len(self.start), self.ways, replace=False)
                picks = [self.start[c] + rng.choice(self.count[c], self.support + self.query, replace=False)
                         for c in classes]
                support.append(np.stack([self.images[p[:self.support]] for p in picks]))
                query.append(np.stack([self.images[p[self.support:]] for p in picks]))
            to_x = lambda a: torch.from_numpy(np.stack(a)).float().div_(255)  # noqa: E731
            labels = torch.arange(self.ways).repeat_interleave(self.support)
            yield to_x(support), labels, to_x(query), torch.arange(self.ways).repeat_interleave(self.query)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (engine.threads)")
    parser.add_argument("--only", nargs="+", help="groups: sine rules modes omniglot miniimagenet episodes")
    parser.add_argument("--quick", action="store_true", help="fewer cases, shorter windows")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/speed_<device>.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.windows, args.seconds = min(args.windows, 3), min(args.seconds, 0.3)
    rows = []
    started = time.time()
    for case in cases(args.device, args.quick):
        if args.only and case["group"] not in args.only:
            continue
        for engine in case["engines"]:
            rows.append(time_case(case, engine, args.device, args.windows, args.seconds, args.warmup))
            print(f"{case['group']:>12} {' '.join(case['settings'][-3:]):<60} {engine:>10} "
                  f"{rows[-1]['ms_per_iteration']:9.2f} ms", flush=True)
    if not args.only or "episodes" in args.only:
        rows += episodes(args.device, args.seconds, args.windows)
    result = {"benchmark": "speed", "command": " ".join(["python -m benchmarks.speed", *(argv or sys.argv[1:])]),
              "machine": machine(torch.device(args.device)), "windows": args.windows, "seconds": args.seconds,
              "warmup": args.warmup, "wall_seconds": time.time() - started, "rows": rows}
    out = write(result, args.out or RESULTS / f"speed_{args.device}.json")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
