"""Train MAML on real Omniglot with the batched engine and Adam, without the full trainer, and
report post-adaptation accuracy on held-out characters: the tool used to tune omniglot_debug.yaml.

    PYTHONPATH=. python benchmarks/omniglot_debug_train.py configs/omniglot_debug.yaml \
        data.root=../shared/data/omniglot train.iterations=300
"""

from __future__ import annotations

import sys
import time

import torch
from torch.func import vmap

from distmaml import meta
from distmaml.config import load_config
from distmaml.models import build_model
from distmaml.tasks import build_task_family
from distmaml.tasks.rng import STREAM_EVAL, STREAM_TRAIN


def evaluate(model, params, family, config, tasks: int) -> tuple[float, float]:
    """Mean query accuracy before and after config.eval.steps inner steps on `tasks` test tasks."""
    batch = family.sample(STREAM_EVAL, 0, torch.arange(tasks), support=config.eval.shots, query=config.eval.query)
    params = meta.detached(params)
    adapted, batched = meta.adapt(model, params, batch.support_x, batch.support_y, config.inner.lr,
                                  config.eval.steps, "first_order", loss_fn=family.loss)
    forward = lambda p, x: meta.functional_forward(model, p, x)
    before = vmap(forward, in_dims=(None, 0))(params, batch.query_x)
    after = vmap(forward, in_dims=(0 if batched else None, 0))(adapted, batch.query_x)
    return (family.accuracy(before, batch.query_y).mean().item(), family.accuracy(after, batch.query_y).mean().item())


def main(argv: list[str]) -> None:
    config = load_config(argv[0], argv[1:])
    torch.manual_seed(config.train.seed)
    torch.set_num_threads(torch.get_num_threads())
    family = build_task_family(config, "cpu")
    model = build_model(config)
    params = dict(model.named_parameters())
    optimizer = torch.optim.Adam(params.values(), lr=config.train.lr)
    start = time.perf_counter()
    batch_size = config.train.meta_batch
    for iteration in range(config.train.iterations):
        batch = family.sample(STREAM_TRAIN, iteration, torch.arange(batch_size))
        result = meta.meta_gradient(model, params, batch, config.inner.lr, config.inner.steps, config.inner.mode,
                                    config.inner.truncate, loss_fn=family.loss)
        for name, value in params.items():
            value.grad = result.grad_sum[name] / batch_size
        optimizer.step()
        if (iteration + 1) % max(1, config.train.log_every) == 0:
            print(f"iteration {iteration + 1}: query loss {result.task_losses.mean():.3f} "
                  f"({time.perf_counter() - start:.1f} s)", flush=True)
    train_s = time.perf_counter() - start
    before, after = evaluate(model, params, family, config, config.eval.tasks)
    print(f"train {train_s:.1f} s, eval {time.perf_counter() - start - train_s:.1f} s; test accuracy "
          f"{before:.3f} before / {after:.3f} after {config.eval.steps} steps ({config.eval.tasks} tasks)")


if __name__ == "__main__":
    main(sys.argv[1:])
