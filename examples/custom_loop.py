"""Your own bi-level problem in a training loop of your own, with distmaml as a library.

The network takes two inputs (x and features of x); the problem is MAML whose inner loss also pulls
each weight towards its initial value with a strength that is itself meta-learned (phi holds the
initial weights, one log pull-strength per weight, and Meta-SGD's step sizes). Everything distmaml
needs of the problem is the six functions below; the loop is plain PyTorch:

    python examples/custom_loop.py          # about a minute on one CPU core
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from distmaml.meta import Inner, functional_forward, make_rule, meta_gradient, meta_parameters, mse, unroll
from distmaml.rng import STREAM_EVAL, STREAM_TRAIN
from distmaml.tasks.sine import SineTasks


class TwoInputNet(nn.Module):
    def __init__(self, width: int = 40):
        super().__init__()
        self.x, self.features = nn.Linear(1, width), nn.Linear(2, width)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 1))

    def forward(self, x, features):
        return self.head(self.x(x) + self.features(features))


class PulledMAML:
    """MAML with a learned pull of every weight towards its initial value in the inner loss."""

    def __init__(self, model: nn.Module):
        self.model, self.names = model, [name for name, _ in model.named_parameters()]

    def meta_parameters(self):  # phi: the initial weights and a log pull-strength per weight
        weights = dict(self.model.named_parameters())
        return {**weights, **{"log_pull." + n: torch.full_like(v, -3.0) for n, v in weights.items()}}

    def inner_template(self):  # the shapes of the inner weights w
        return dict(self.model.named_parameters())

    def start(self, phi, task):  # every task starts at phi's weights
        return {name: phi[name] for name in self.names}

    def predict(self, weights, x):
        return functional_forward(self.model, weights, x, torch.cat([torch.sin(x), torch.cos(x)], -1))

    def inner_loss(self, weights, phi, task, step):
        pull = sum((phi["log_pull." + n].exp() * (weights[n] - phi[n]) ** 2).sum() for n in self.names)
        return mse(self.predict(weights, task.support_x), task.support_y) + 0.5 * pull

    def outer_loss(self, weights, phi, task):
        return mse(self.predict(weights, task.query_x), task.query_y)

    def metrics(self, weights, phi, task):
        return {"loss": self.outer_loss(weights, phi, task)}

    def to(self, device):
        return PulledMAML(copy.deepcopy(self.model).to(device))


def train(iterations: int = 2000, meta_batch: int = 25, seed: int = 0) -> tuple[float, float]:
    """Meta-train; return the query MSE of 200 fresh tasks after adaptation, before and after training."""
    torch.manual_seed(seed)
    problem = PulledMAML(TwoInputNet())
    inner = Inner(make_rule("meta_sgd", lr=0.01), steps=2, method="second_order")
    phi = meta_parameters(problem, inner)  # weights, pull strengths and learned step sizes: one call
    optimizer = torch.optim.Adam(phi.values(), lr=1e-3)
    tasks = SineTasks(seed=seed)
    held_out = tasks.sample(STREAM_EVAL, 0, torch.arange(200))

    def adapted_loss() -> float:
        with torch.no_grad():
            weights = unroll(problem, phi, held_out, inner, differentiated=0).weights
            return torch.func.vmap(problem.outer_loss, (0, None, 0))(weights, phi, held_out).mean().item()

    before = adapted_loss()
    for iteration in range(iterations):
        result = meta_gradient(problem, phi, tasks.sample(STREAM_TRAIN, iteration, torch.arange(meta_batch)), inner)
        for value, grad_sum in zip(phi.values(), result.grad_sum.values()):
            value.grad = grad_sum / meta_batch  # meta_gradient sums over tasks
        optimizer.step()
    return before, adapted_loss()


if __name__ == "__main__":
    torch.set_num_threads(1)
    before, after = train()
    print(f"query MSE of 200 fresh tasks after 2 inner steps: {before:.3f} untrained, {after:.3f} meta-trained")
