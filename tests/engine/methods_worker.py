"""Every hypergradient method that applies to a problem whose tasks are random initialisations, a few
outer steps each through the trainer's engine (sample, method, one all-reduce, Adam), in whatever
process group the launcher set up: the logistic weight-decay problem (`decay`), or the learning rate
of an MLP on a subsample of MNIST-1D with mini-batches (`learning_rate`), or distilled digits
(`distill`). tests/engine/test_dist.py
runs it as one process and under torchrun with two, and compares the meta-parameters it saves."""

import sys

import torch

from distmaml.build import build
from distmaml.config import load_config
from distmaml.engine import dist
from distmaml.engine.step import MetaStep, make_optimizer

PROBLEMS = {
    "decay": ("configs/logistic_weight_decay.yaml", ("second_order", "truncated", "implicit", "neumann",
                                                     "finite_difference"), []),
    "learning_rate": ("configs/mnist1d_lr.yaml", ("second_order", "truncated", "first_order", "finite_difference"),
                      ["task.args.train=300", "model.hidden=[16]", "inner.schedule_blocks=2", "inner.lr=0.3"]),
    "distill": ("configs/digits_distill.yaml", ("second_order", "truncated"),
                ["model.hidden=[16]", "inner.schedule_blocks=20"]),
}


def main(problem: str, out: str) -> None:
    ctx = dist.init("cpu", threads=1)
    results = {}
    path, methods, extra = PROBLEMS[problem]
    for mode in methods:
        # Five tasks over two ranks (3 + 2); float64, so that the shards' sums agree to the last bits.
        config = load_config(path, [f"inner.mode={mode}", "inner.steps=20", "inner.truncate=5", "train.meta_batch=5",
                                    "engine.dtype=float64", "implicit.inner_safeguard=false", "train.lr=0.1", *extra])
        torch.manual_seed(config.train.seed)
        learner = build(config, ctx.device)
        step = MetaStep(learner, make_optimizer(learner.theta.values(), config.train.lr, ctx.device), config, ctx)
        for iteration in range(3):
            step(iteration)
        results[mode] = {name: value.detach().clone() for name, value in learner.theta.items()}
    if ctx.is_main:
        torch.save(results, out)
    dist.teardown()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
