"""Plain nn.Modules. Meta-learning never mutates them: the engine runs them on explicit parameter
dicts through torch.func.functional_call, so one module serves every task and every inner step."""

from __future__ import annotations

import torch
from torch import nn

OMNIGLOT_IMAGE_SIZE = 28


class MLP(nn.Module):
    """Fully connected ReLU network, 1 -> 40 -> 40 -> 1 for the MAML paper's sine regression."""

    def __init__(self, in_features: int = 1, hidden: tuple[int, ...] | list[int] = (40, 40), out_features: int = 1):
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = []
        for width_in, width_out in zip(widths[:-1], widths[1:]):
            layers += [nn.Linear(width_in, width_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], out_features))
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class BatchStatNorm2d(nn.Module):
    """BatchNorm2d that always normalises with the current batch's mean and (biased) variance and
    keeps no running averages: the same function as nn.BatchNorm2d(track_running_stats=False).

    Written with plain tensor operations because PyTorch's fused batch_norm gives wrong
    second-order gradients under vmap (relative errors of 1e-2 in float64 against the per-task
    loop and finite differences, torch 2.13; cf. pytorch/functorch#534, its backward batching
    rule); composed of means and products, vmap and double backward are exact.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        mean = x.mean(dim=(0, 2, 3), keepdim=True)
        centred = x - mean
        variance = (centred * centred).mean(dim=(0, 2, 3), keepdim=True)
        scale = self.weight[:, None, None] * torch.rsqrt(variance + self.eps)
        return centred * scale + self.bias[:, None, None]


class Conv4(nn.Module):
    """The MAML paper's Omniglot network: 4 x (3x3 conv, `channels` filters, stride 2, BatchNorm,
    ReLU), 28 -> 14 -> 7 -> 4 -> 2 pixels, then a linear layer to the N ways.

    BatchNorm always normalises with the current batch's statistics and keeps no running
    averages (BatchStatNorm2d), as in the MAML reference code: running averages would be written
    from inside vmap and again by every recomputed inner step, and so would be wrong.
    """

    def __init__(self, ways: int, channels: int = 64, in_channels: int = 1, image_size: int = OMNIGLOT_IMAGE_SIZE):
        super().__init__()
        blocks: list[nn.Module] = []
        size = image_size
        for block_in in (in_channels, channels, channels, channels):
            # No convolution bias: BatchNorm subtracts the batch mean right after, so a bias
            # would have an exactly zero gradient and never move.
            blocks += [nn.Conv2d(block_in, channels, 3, stride=2, padding=1, bias=False),
                       BatchStatNorm2d(channels), nn.ReLU()]
            size = (size + 1) // 2
        self.features = nn.Sequential(*blocks, nn.Flatten())
        self.classifier = nn.Linear(channels * size * size, ways)

    def forward(self, x):
        return self.classifier(self.features(x))


def initialise(model: nn.Module, scheme: str = "pytorch", std: float = 0.01) -> nn.Module:
    """Re-draw the initial weights of every linear and convolutional layer as `scheme` says.

    "pytorch" keeps the layers' own defaults (Kaiming-uniform weights and biases); "truncated_normal"
    is the MAML reference code's (cbfinn/maml, construct_fc_weights): weights from a normal of
    standard deviation `std` re-drawn beyond 2 std, biases zero. Normalisation layers keep scale 1
    and shift 0. Draws from torch's global generator, so the seed set before decides them.
    """
    if scheme == "pytorch":
        return model
    if scheme != "truncated_normal":
        raise ValueError(f"model.init must be pytorch or truncated_normal, got {scheme!r}")
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model


def build_model(config) -> nn.Module:
    """The network named by config.model, shaped for config.task, initialised as config.model.init says."""
    if config.model.kind == "mlp":
        if config.task.family != "sine":
            raise ValueError(f"model.kind = 'mlp' fits task.family = 'sine', not {config.task.family!r}")
        model = MLP(1, config.model.hidden, 1)
    elif config.model.kind == "conv4":
        if config.task.family != "omniglot":
            raise ValueError(f"model.kind = 'conv4' fits task.family = 'omniglot', not {config.task.family!r}")
        model = Conv4(config.task.ways, config.model.channels)
    else:
        raise ValueError(f"model.kind = {config.model.kind!r} is not available")
    return initialise(model, config.model.init, config.model.init_std)
