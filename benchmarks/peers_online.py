"""One online outer step of the reweighting problems by distmaml and by the peers: equal first, then time and memory.

    python -m benchmarks.peers_online                 # -> results/peers_online_cpu.json
    python -m benchmarks.peers_online --quick

The problems of configs/mnist1d_l2rw_online.yaml and configs/mnist1d_mwn_online.yaml (MNIST-1D, half
of the labels flipped, the 40-100-100-10 MLP, mini-batches of 100, inner SGD at 0.5), at N = 1 and
N = 16 persistent runs, each at its own weights (their own initialisations) and mini-batch:

- Learning to Reweight: the batch's example weights from a one-step lookahead, then the real step.
  distmaml: LearningToReweight's step for all runs at once (meta.online.advance). TorchOpt: its L2R
  example, per run: torchopt.MetaSGD for the lookahead on sum_i eps_i l_i, the gradient of the
  validation loss with respect to eps, torchopt.recover_state_dict, then the real step by
  torch.optim.SGD. plain-loop: the same per run in torch.autograd alone.
- Meta-Weight-Net, finite difference: phi's hypergradient through one SGD step (online.unroll = 1) by
  distmaml's FiniteDifference method (DARTS's formula: the second derivatives at the weights before
  the step), then the real step with the updated net; Betty: an Engine per run, its lower level an
  ImplicitProblem trained by torch.optim.SGD (unroll_steps = 1), its upper one the weighting net with
  Betty's `darts` hypergradient, which omits the inner step size (compared after dividing distmaml's
  by it) and takes the second derivatives at the weights AFTER the real step. The two agree where those
  weights coincide (an inner step size of 1e-8 here); at the config's rate their relative difference
  is reported as it is. (Betty reads darts_alpha from the lower level's config, whose weights it
  perturbs.) Both differences of first derivatives also see the net's input, the example's loss, move
  with the weights: the net reads it detached, so the exact one-step hypergradient (second order)
  differs from both; that is the finite-difference method's approximation on this problem, not the
  comparison's.

Equality in float64 first (1e-6 relative); then the seconds per outer step in float32 on one thread
(medians of --windows windows), each implementation as its examples use it (the peers loop over the
runs), and the peak resident memory of each at N = 16 in a fresh process.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from benchmarks.common import REPO, RESULTS, fresh_process, machine, median_seconds, one_line, write
from benchmarks.tables import markdown_table
from benchmarks.peers_betty import PeerFailed, _Phi, _quiet_betty
from distmaml.build import build
from distmaml.config import load_config
from distmaml.engine.schedule import Online
from distmaml.meta import FiniteDifference, FirstOrder, Inner, meta_gradient
from distmaml.meta.online import advance, with_rule
from distmaml.meta.rules import SGD

TOLERANCE = 1e-6
CONFIGS = {"learning_to_reweight": "configs/mnist1d_l2rw_online.yaml", "weighting_net": "configs/mnist1d_mwn_online.yaml"}
EPS = 1e-4  # the finite differences' length in weight space (finite_difference.eps, Betty's darts_alpha)


def setup(problem: str, runs: int, dtype: str = "float64", lr: float | None = None):
    overrides = [f"online.runs={runs}", f"engine.dtype={dtype}", "logging.progress=false"]
    if lr is not None:
        overrides.append(f"inner.lr={lr}")
    config = load_config(REPO / CONFIGS[problem], overrides)
    torch.manual_seed(0)
    learner = build(config)
    online = Online(learner, config, torch.arange(runs))
    online.start()
    return config, learner, online


def _batch(learner, online, run: int):
    problem, runs = learner.problem, online.runs
    return problem.batch({"seed": runs.tasks["seed"][run]}, int(runs.step[run]))


def _weights_of(online, run: int) -> dict[str, torch.Tensor]:
    return {name: value[run].detach().clone() for name, value in online.runs.weights.items()}


# ----------------------------------------------------------------------------- Learning to Reweight


def distmaml_l2rw(config, learner, online) -> dict[str, torch.Tensor]:
    inner = with_rule(Inner(SGD(config.inner.lr), 1, FirstOrder()), 1)
    return advance(online.problem, inner, {}, online.runs, 1).weights


def _l2rw_loss(model, params, x, y, weights):
    return (weights * F.cross_entropy(functional_call(model, params, (x,)), y, reduction="none")).sum()


def plain_l2rw(config, learner, online) -> dict[str, torch.Tensor]:
    model, data, lr = learner.model, learner.problem.data, config.inner.lr
    out = []
    for run in range(len(online.runs.step)):
        x, y = _batch(learner, online, run)
        params = {name: value.requires_grad_() for name, value in _weights_of(online, run).items()}
        eps = torch.zeros(x.shape[0], dtype=x.dtype, requires_grad=True)
        step = torch.autograd.grad(_l2rw_loss(model, params, x, y, eps), list(params.values()), create_graph=True)
        lookahead = {name: value - lr * g for (name, value), g in zip(params.items(), step)}
        found, = torch.autograd.grad(F.cross_entropy(functional_call(model, lookahead, (data.val_x,)), data.val_y),
                                     eps)
        raw = torch.clamp(-found, min=0)
        weights = raw / raw.sum() if raw.sum() > 0 else raw
        grads = torch.autograd.grad(_l2rw_loss(model, params, x, y, weights), list(params.values()))
        out.append({name: (value - lr * g).detach() for (name, value), g in zip(params.items(), grads)})
    return {name: torch.stack([run[name] for run in out]) for name in out[0]}


def torchopt_l2rw(config, learner, online) -> dict[str, torch.Tensor]:
    import torchopt

    data, lr = learner.problem.data, config.inner.lr
    out = []
    for run in range(len(online.runs.step)):
        x, y = _batch(learner, online, run)
        net = copy.deepcopy(learner.model)
        with torch.no_grad():
            for name, value in net.named_parameters():
                value.copy_(online.runs.weights[name][run])
        meta_optimizer = torchopt.MetaSGD(net, lr=lr)
        optimizer = torch.optim.SGD(net.parameters(), lr=lr)
        state = torchopt.extract_state_dict(net)
        eps = torch.zeros(x.shape[0], dtype=x.dtype, requires_grad=True)
        meta_optimizer.step((eps * F.cross_entropy(net(x), y, reduction="none")).sum())
        found, = torch.autograd.grad(F.cross_entropy(net(data.val_x), data.val_y), eps)
        raw = torch.clamp(-found, min=0)
        weights = raw / raw.sum() if raw.sum() > 0 else raw
        torchopt.recover_state_dict(net, state)
        optimizer.zero_grad()
        (weights * F.cross_entropy(net(x), y, reduction="none")).sum().backward()
        optimizer.step()
        out.append({name: value.detach().clone() for name, value in net.named_parameters()})
    return {name: torch.stack([run[name] for run in out]) for name in out[0]}


# ------------------------------------------------------------------------------- Meta-Weight-Net


def distmaml_mwn(config, learner, online) -> torch.Tensor:
    """phi's finite-difference hypergradient of one online step (summed over runs), divided by the step size."""
    inner = with_rule(Inner(SGD(config.inner.lr), 1, FiniteDifference(EPS)), 1)
    result = meta_gradient(online.problem, learner.theta, online.runs.as_tasks(), inner)
    return torch.cat([value.reshape(-1) for value in result.grad_sum.values()]) / config.inner.lr


def distmaml_mwn_step(config, learner, online, optimizer) -> None:
    """A whole online outer step as the trainer takes it: hypergradient, Adam, the runs' real step."""
    inner = with_rule(Inner(SGD(config.inner.lr), 1, FiniteDifference(EPS)), 1)
    result = meta_gradient(online.problem, learner.theta, online.runs.as_tasks(), inner)
    for param, value in zip(learner.theta.values(), result.grad_sum.values()):
        param.grad = value / len(online.runs.step)
    optimizer.step()
    online.advance(learner.theta)


class _Steps:
    """A lower level's data loader for Betty: each batch is the next step's index, drawn without end."""

    def __iter__(self):
        return ((torch.tensor(step),) for step in itertools.count())


def _betty_engine(config, learner, online, run: int, captured: list | None):
    from betty.configs import Config, EngineConfig
    from betty.engine import Engine
    from betty.problems import ImplicitProblem

    problem, task = learner.problem, {"seed": online.runs.tasks["seed"][run]}
    start = int(online.runs.step[run])
    module = copy.deepcopy(learner.model)
    with torch.no_grad():
        for name, value in module.named_parameters():
            value.copy_(online.runs.weights[name][run])

    class Upper(ImplicitProblem):
        def training_step(self, batch):
            return problem.outer_loss(dict(self.lower.module.named_parameters()), self.module.as_dict(), task)

        def grad_callback(self):
            if captured is not None:
                captured.append(torch.cat([value.grad.detach().reshape(-1) for value in self.module.values]))

    class Lower(ImplicitProblem):
        def training_step(self, batch):
            return problem.inner_loss(dict(self.module.named_parameters()), self.upper.module.as_dict(), task,
                                      start + int(batch[0]))

    net = _Phi({name: value.detach() for name, value in learner.theta.items()})
    upper = Upper(name="upper", module=net, optimizer=torch.optim.Adam(net.parameters(), lr=config.train.lr),
                  train_data_loader=[(torch.tensor(0),)], config=Config(type="darts", darts_alpha=EPS))
    lower = Lower(name="lower", module=module, optimizer=torch.optim.SGD(module.parameters(), lr=config.inner.lr),
                  train_data_loader=_Steps(),
                  # darts reads its length from the level whose weights it perturbs: the lower one.
                  config=Config(unroll_steps=1, darts_alpha=EPS))
    _quiet_betty()
    engine = Engine(problems=[upper, lower], config=EngineConfig(train_iters=10 ** 6, strategy="cpu"),
                    dependencies={"u2l": {upper: [lower]}, "l2u": {lower: [upper]}})
    engine.train()
    return engine


def _betty_step(engine) -> None:
    engine.global_step += 1
    engine.train_step()


def betty_mwn(config, learner, online) -> torch.Tensor:
    total = None
    for run in range(len(online.runs.step)):
        captured: list = []
        try:
            _betty_step(_betty_engine(config, learner, online, run, captured))
        except Exception as err:  # noqa: BLE001 - Betty's own failure, reported in the row
            raise PeerFailed(f"Betty fails: {one_line(err, None)}") from err
        total = captured[0] if total is None else total + captured[0]
    return total


# ----------------------------------------------------------------------------------- comparisons


def _relative(a, b) -> float:
    if isinstance(a, dict):
        a, b = (torch.cat([part[name].reshape(-1) for name in sorted(part)]) for part in (a, b))
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def compare(runs: int) -> list[dict[str, Any]]:
    rows = []
    config, learner, online = setup("learning_to_reweight", runs)
    reference = distmaml_l2rw(config, learner, online)
    for library, fn in (("torchopt", torchopt_l2rw), ("plain-loop", plain_l2rw)):
        error = _relative(fn(config, learner, online), reference)
        rows.append({"problem": "learning_to_reweight", "library": library, "runs": runs, "rel_error": error,
                     "equal": error <= TOLERANCE})
    for lr, what in ((1e-8, "inner.lr = 1e-8: the same weights"), (None, "the config's inner.lr")):
        config, learner, online = setup("weighting_net", runs, lr=lr)
        ours = distmaml_mwn(config, learner, online)
        try:
            error = _relative(betty_mwn(config, learner, online), ours)
        except PeerFailed as err:
            rows.append({"problem": "weighting_net", "library": "betty", "runs": runs, "failed": str(err)})
            continue
        rows.append({"problem": "weighting_net", "library": "betty", "runs": runs, "where": what, "rel_error": error,
                     "equal": error <= TOLERANCE})
    return rows


def time_step(problem: str, library: str, runs: int, windows: int, seconds: float) -> float:
    config, learner, online = setup(problem, runs, dtype="float32")
    if problem == "learning_to_reweight":
        fn = {"distmaml": distmaml_l2rw, "torchopt": torchopt_l2rw, "plain-loop": plain_l2rw}[library]
        return median_seconds(lambda: fn(config, learner, online), windows, seconds)
    if library == "distmaml":
        optimizer = torch.optim.Adam(learner.theta.values(), lr=config.train.lr)
        return median_seconds(lambda: distmaml_mwn_step(config, learner, online, optimizer), windows, seconds)
    engines = [_betty_engine(config, learner, online, run, None) for run in range(runs)]
    return median_seconds(lambda: [_betty_step(engine) for engine in engines], windows, seconds)


LIBRARIES = {"learning_to_reweight": ("distmaml", "torchopt", "plain-loop"), "weighting_net": ("distmaml", "betty")}

MEMORY_CASE = """
import json, sys, torch
torch.set_num_threads(1)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
from benchmarks import peers_online as bench
problem, library, runs = sys.argv[1], sys.argv[2], int(sys.argv[3])
config, learner, online = bench.setup(problem, runs, dtype="float32")
before = status("VmRSS")
bench.time_step(problem, library, runs, windows=1, seconds=0.0)
print(json.dumps({"peak_mib": (status("VmHWM") - before) / 2 ** 20}))
"""


def peak_mib(problem: str, library: str, runs: int) -> float:
    return fresh_process(MEMORY_CASE, problem, library, str(runs), what=f"memory case {problem} {library}")["peak_mib"]


def table(result: dict[str, Any]) -> str:
    """The equality rows, then seconds per outer step and peak memory (the report's table)."""
    equal = [[row["problem"], row["library"], str(row["runs"]), row.get("where", "the config's inner.lr"),
              row["failed"] if "failed" in row else f"{row['rel_error']:.1e}" + (" (equal)" if row["equal"] else "")]
             for row in result["equality"]]
    text = markdown_table(["problem", "peer", "runs", "at", "relative difference from distmaml, float64"], equal)
    timed = []
    for row in result["timing"]:
        speedup = row.get("speedup_over_fastest_other")
        timed.append([row["problem"], row["library"], str(row["runs"]), f"{1000 * row['seconds_per_step']:.1f}",
                      f"{speedup:.2f}x" if speedup else "", "" if row["peak_mib"] is None else f"{row['peak_mib']:.0f}"])
    return text + "\n\n" + markdown_table(["problem", "implementation", "runs", "ms per outer step",
                                             "distmaml's speed-up over the fastest other",
                                             "peak MiB above baseline (N = 16)"], timed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers_online", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.windows, args.seconds = 3, 0.3
    equality = [row for runs in (1, 16) for row in compare(runs)]
    for row in equality:
        print(f"equal? {row['problem']} {row['library']} N={row['runs']} {row.get('where', '')}: "
              f"{row.get('rel_error', row.get('failed'))}", flush=True)
    timing = []
    for problem, libraries in LIBRARIES.items():
        for runs in (1, 16):
            for library in libraries:
                seconds = time_step(problem, library, runs, args.windows, args.seconds)
                row = {"problem": problem, "library": library, "runs": runs, "seconds_per_step": seconds,
                       "peak_mib": peak_mib(problem, library, runs) if runs == 16 else None}
                timing.append(row)
                print(f"{problem} N={runs} {library}: {1000 * seconds:.2f} ms per outer step, peak "
                      f"{row['peak_mib']} MiB", flush=True)
    for row in timing:
        others = [other["seconds_per_step"] for other in timing if other["problem"] == row["problem"]
                  and other["runs"] == row["runs"] and other["library"] != "distmaml"]
        if row["library"] == "distmaml" and others:
            row["speedup_over_fastest_other"] = min(others) / row["seconds_per_step"]
    command = f"python -m benchmarks.peers_online {' '.join(argv if argv is not None else sys.argv[1:])}".strip()
    write({"benchmark": "peers_online", "equality": equality, "timing": timing, "command": command,
           "machine": machine(torch.device("cpu")), "tolerance": TOLERANCE},
          args.out or RESULTS / "peers_online_cpu.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
