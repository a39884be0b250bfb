"""Plain nn.Modules. Meta-learning never mutates them: the engine runs them on explicit parameter
dicts through torch.func.functional_call, so one module serves every task and every inner step."""

from __future__ import annotations

from torch import nn


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


def build_model(config) -> nn.Module:
    """The network named by config.model, shaped for config.task."""
    if config.model.kind == "mlp":
        if config.task.family != "sine":
            raise ValueError(f"model.kind = 'mlp' fits task.family = 'sine', not {config.task.family!r}")
        return MLP(1, config.model.hidden, 1)
    raise ValueError(f"model.kind = {config.model.kind!r} is not available")
