"""Betty (betty-ml) on the hypergradient cases of benchmarks/peers_hyper: one Engine per initialisation.

Betty states a bi-level problem as two `Problem` objects joined by an `Engine`: the lower one trains
the network, the upper one holds phi; after `unroll_steps` lower steps the upper one computes its
hypergradient. Each function here builds that pair for one initialisation, runs the lower level for
the case's T steps from that initialisation (the same mini-batches: a batch is the step's index, and
the problem's own inner loss draws the step's examples), and reads phi's gradient in the upper
problem's `grad_callback`, before its optimizer would step.

- unrolled (learning_rate, distill): the lower level is Betty's `HigherIterativeProblem` (higher's
  differentiable SGD underneath), the step's rate set from phi (exp of the step's log rate) as a
  tensor in the optimizer's parameter group before each step; the upper one sets
  `first_order=False`, so its gradient is the derivative through the T steps. This path has never
  produced a hypergradient: Betty 0.2.1 fails before its first step (below).
- implicit (weight_decay, hyperclean): the lower level is an `ImplicitProblem` trained by
  torch.optim.SGD; the upper problem's hypergradient is Betty's `neumann` (the series
  alpha sum_j (I - alpha H)^j v, the same polynomial as distmaml's Neumann) or its `cg`. Betty 0.2.1's
  cg builds the next search direction from the previous residual, not the new one, so it is not
  conjugate gradients and does not converge to H^-1 v (benchmarks/peers_hyper reports the difference).

Betty 0.2.1's two unrolled problem classes do not start: `IterativeProblem` patches its optimizer twice
and then reads a parameter group it removed (KeyError 'params'), and `HigherIterativeProblem` asks
higher to monkey-patch its module a second time, which higher refuses. The unrolled cases therefore
report Betty's own error (`unrolled_failure` reproduces it on a two-layer toy problem), and the
implicit ones are compared.

betty-ml 0.2.1 declares Python < 3.11 but runs on 3.11 with the torch here; .ci/run installs it with
`--ignore-requires-python --no-deps`.
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from torch import nn

from benchmarks.common import one_line


class PeerFailed(RuntimeError):
    """Betty itself raised: the row reports its error instead of a hypergradient."""


class _OursFailed(Exception):
    """Our own code, called back by Betty, raised: re-raised as itself, never blamed on Betty."""


def _ours(method):
    def call(*args, **kwargs):
        try:
            return method(*args, **kwargs)
        except Exception as err:
            raise _OursFailed() from err

    return call


def _quiet_betty():
    from betty.logging import get_logger

    get_logger().setLevel(logging.WARNING)  # Betty logs every engine's set-up at INFO on stdout


class _Phi(nn.Module):
    """phi as a module's parameters, Betty's unit of optimisation (names with dots are not allowed)."""

    def __init__(self, phi: dict[str, torch.Tensor]):
        super().__init__()
        self.names = list(phi)
        self.values = nn.ParameterList([nn.Parameter(value.detach().clone()) for value in phi.values()])

    def as_dict(self) -> dict[str, torch.Tensor]:
        return dict(zip(self.names, self.values))


def _steps(count: int):
    return [(torch.tensor(step),) for step in range(count)]


def hypergradient(problem, phi: dict[str, torch.Tensor], task: Any, start: dict[str, torch.Tensor], steps: int,
                  lower_kind: str, lr: float = 0.0, **method) -> torch.Tensor:
    """One initialisation's hypergradient by a Betty engine. `lower_kind`: "unrolled" (the step sizes
    come from phi) or "implicit" (SGD at `lr`; `method`: Betty's Config fields of the hypergradient,
    such as type="neumann", neumann_iterations=20, neumann_alpha=0.1)."""
    from betty.configs import Config
    from betty.problems import HigherIterativeProblem, ImplicitProblem

    names = list(start)
    module = copy.deepcopy(problem.model)
    with torch.no_grad():
        for name, value in module.named_parameters():
            value.copy_(start[name])
    captured: list[torch.Tensor] = []

    class Upper(ImplicitProblem):
        @_ours
        def training_step(self, batch):
            return problem.outer_loss(self.lower.weights(), self.module.as_dict(), task)

        @_ours
        def grad_callback(self):
            captured.extend(torch.zeros_like(value) if value.grad is None else value.grad.detach().clone()
                            for value in self.module.values)

    class Lower(HigherIterativeProblem if lower_kind == "unrolled" else ImplicitProblem):
        def weights(self):
            if lower_kind == "unrolled":  # higher's patched module: its current (fast) weights
                return dict(zip(names, self.module.fast_params))
            return dict(self.module.named_parameters())

        @_ours
        def training_step(self, batch):
            step, phi_now = int(batch[0]), self.upper.module.as_dict()
            if lower_kind == "unrolled":  # the step's rate, a tensor in phi: higher's update differentiates it
                rates = phi_now["inner.lr.log_schedule"]
                self.optimizer.param_groups[0]["lr"] = rates[min(step * rates.shape[0] // steps,
                                                                 rates.shape[0] - 1)].exp()
            return problem.inner_loss(self.weights(), phi_now, task, step)

    upper_module = _Phi(phi)
    upper = Upper(name="upper", module=upper_module, optimizer=torch.optim.SGD(upper_module.parameters(), lr=0.0),
                  train_data_loader=[(torch.tensor(0),)], config=Config(first_order=lower_kind != "unrolled"))
    lower = Lower(name="lower", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=lr),
                  train_data_loader=_steps(steps), config=Config(**method, unroll_steps=steps))
    _run_engine(upper, lower, steps)
    return torch.cat([g.reshape(-1) for g in captured])


def _run_engine(upper, lower, steps: int) -> None:
    from betty.configs import EngineConfig
    from betty.engine import Engine

    _quiet_betty()
    try:
        Engine(problems=[upper, lower], config=EngineConfig(train_iters=steps, strategy="cpu"),
               dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}}).run()
    except _OursFailed as err:  # a bug of ours: its own traceback, not a row blaming Betty
        raise err.__cause__ from None
    except Exception as err:  # noqa: BLE001 - Betty's own failure, reported in the row
        raise PeerFailed(f"Betty {_version()} fails: {one_line(err, None)}") from err


def _version() -> str:
    from importlib.metadata import version

    return version("betty-ml")


def unrolled_failure() -> str | None:
    """Why Betty cannot differentiate through unrolled steps here (each unrolled problem class's
    error on a toy problem: a linear lower level trained two steps), or None when both run."""
    from betty.configs import Config
    from betty.problems import HigherIterativeProblem, ImplicitProblem, IterativeProblem

    data = [(torch.linspace(-1, 1, 12).reshape(4, 3),)]
    failures = []
    for kind in (IterativeProblem, HigherIterativeProblem):
        class Upper(ImplicitProblem):
            def training_step(self, batch):
                return self.lower.module(batch[0]).pow(2).mean()

        class Lower(kind):
            def training_step(self, batch):
                return (self.module(batch[0]) - 1).pow(2).mean() + self.upper.module.weight.sum()

        upper_module, lower_module = nn.Linear(3, 1), nn.Linear(3, 1)
        upper = Upper(name="upper", module=upper_module, optimizer=torch.optim.SGD(upper_module.parameters(), lr=0.1),
                      train_data_loader=data, config=Config(first_order=False))
        lower = Lower(name="lower", module=lower_module, optimizer=torch.optim.SGD(lower_module.parameters(), lr=0.1),
                      train_data_loader=data, config=Config(unroll_steps=2))
        try:
            _run_engine(upper, lower, 2)
        except PeerFailed as err:
            failures.append(f"{kind.__name__}: {err.__cause__ and one_line(err.__cause__, None)}")
    return f"Betty {_version()}: its unrolled problems fail to start ({'; '.join(failures)})" if failures else None
