"""distmaml against the MAML libraries people use, side by side in one process: learn2learn's
MAML.clone()/adapt(), higher's innerloop_ctx, TorchOpt's MetaSGD.

    pip install -e ".[peers]"                      # higher and torchopt; learn2learn: docs/results.md, .ci/run
    python -m benchmarks.peers                     # this CPU, one thread: the README's peers table

Every library gets the same initial weights, the same task batches (distmaml's families) and the
same network (the sine MLP; Conv-4 on Omniglot-shaped tasks). Before anything is timed, each
library's meta-gradient is computed in float64 for one batch and must equal distmaml's to a
relative error of 1e-10: the comparison is of the same computation. Then one meta-iteration
(sample the batch, the meta-gradient, an Adam step) is timed in float32 for each, the peers in
the per-task loop their documentation shows. A library that is not installed is reported so and
skipped; one that is installed but whose import fails is an error (its rows say why, and the
command exits 1 after writing its results). Betty (betty-ml) is named with the reason it is not
compared: its unrolled problems, which MAML needs, fail to start in 0.2.1 (benchmarks/peers_betty.py
runs them on a toy problem and reports their errors).
Differentiable Adam inner steps are compared with higher's DifferentiableAdam the same way.

Beside the libraries, in both networks' SGD rows, two implementations written for the benchmark
with torch alone ("written_here" in the results; not in "libraries"):
- plain-loop: the per-task loop a user writes with torch.autograd.grad (create_graph for the second
  order), each task's query loss back-propagated at once.
- hand-batched: every task at once on stacked weights [tasks, ...]: one baddbmm per linear layer (the
  MLP's activations as they are); Conv-4's tasks side by side in the channels, one grouped
  convolution (groups = tasks) per layer, so that its batch statistics are per task; the tasks'
  gradients from one torch.autograd.grad of the sum of their losses (tasks share no weights).
distmaml's rows add speedup_over_fastest_loop (the fastest per-task loop, a library's or the plain
loop's, over distmaml's time) and speed_vs_hand_batched (the hand-batched time over distmaml's).
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import importlib.util
import sys
import time
import types
from typing import Any, Callable, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from benchmarks.common import OMNIGLOT_SHAPED, REPO, RESULTS, config_for, machine, median_seconds, one_line, write
from distmaml.build import build
from distmaml.meta import MAML, Inner, make_rule, meta_gradient, meta_gradient_loop
from distmaml.models import MLP, BatchStatNorm2d, Conv4
from distmaml.rng import STREAM_TRAIN

SINE = REPO / "configs/sine_maml.yaml"
TOLERANCE = 1e-10


# ------------------------------------------------------------------------------------ the peers


@functools.cache  # once: the modules loaded alone stand in sys.modules for the package afterwards
def load_learn2learn():
    """learn2learn's MAML class. Its package __init__ imports torchvision, gym and more, which MAML never
    uses (and which may be missing); if that import fails, the algorithm's own modules are loaded
    alone -- still learn2learn's code, unchanged. Not installed: ModuleNotFoundError."""
    spec = importlib.util.find_spec("learn2learn")
    if spec is None:
        raise ModuleNotFoundError("No module named 'learn2learn'", name="learn2learn")
    try:
        import learn2learn
        return learn2learn.algorithms.MAML, f"import learn2learn {learn2learn.__version__}"
    except Exception as err:  # noqa: BLE001 - the package's own __init__; its MAML is loaded alone below
        why = one_line(err)
    for name in ("learn2learn", "learn2learn.algorithms"):
        package = types.ModuleType(name)
        package.__path__ = [str(spec.submodule_search_locations[0]) + ("/algorithms" if "." in name else "")]
        sys.modules[name] = package
    maml = importlib.import_module("learn2learn.algorithms.maml")
    return maml.MAML, f"learn2learn.algorithms.maml alone (import learn2learn: {why})"


def learn2learn_step(MAML) -> Callable:
    def meta_grads(model, batch, loss_fn, lr, steps, first_order, _):
        maml = MAML(model, lr=lr, first_order=first_order)
        for i in range(batch.num_tasks):
            learner = maml.clone()
            for _ in range(steps):
                learner.adapt(loss_fn(learner(batch.support_x[i]), batch.support_y[i]))
            loss_fn(learner(batch.query_x[i]), batch.query_y[i]).backward()

    return meta_grads


def higher_step(higher) -> Callable:
    def meta_grads(model, batch, loss_fn, lr, steps, first_order, inner_optimizer):
        optimizer = inner_optimizer(model.parameters(), lr)
        for i in range(batch.num_tasks):
            with higher.innerloop_ctx(model, optimizer, copy_initial_weights=False,
                                      track_higher_grads=not first_order) as (fmodel, diffopt):
                for _ in range(steps):
                    diffopt.step(loss_fn(fmodel(batch.support_x[i]), batch.support_y[i]))
                loss = loss_fn(fmodel(batch.query_x[i]), batch.query_y[i])
                if first_order:  # higher's untracked unroll: the query gradient at the adapted weights
                    grads = torch.autograd.grad(loss, list(fmodel.parameters()))
                    for param, grad in zip(model.parameters(), grads):
                        param.grad = grad if param.grad is None else param.grad + grad
                else:
                    loss.backward()

    return meta_grads


def torchopt_step(torchopt) -> Callable:
    def meta_grads(model, batch, loss_fn, lr, steps, first_order, _):
        inner = torchopt.MetaSGD(model, lr=lr)
        model_state = torchopt.extract_state_dict(model)
        optimizer_state = torchopt.extract_state_dict(inner)
        originals = list(model.parameters())
        for i in range(batch.num_tasks):
            for _ in range(steps):
                inner.step(loss_fn(model(batch.support_x[i]), batch.support_y[i]))
            loss = loss_fn(model(batch.query_x[i]), batch.query_y[i])
            if first_order:  # the query gradient at the adapted weights (TorchOpt's unroll keeps its graph)
                grads = torch.autograd.grad(loss, list(model.parameters()))
                for param, grad in zip(originals, grads):
                    param.grad = grad if param.grad is None else param.grad + grad
            else:
                loss.backward()
            torchopt.recover_state_dict(model, model_state)
            torchopt.recover_state_dict(inner, optimizer_state)

    return meta_grads


class Peer(NamedTuple):
    """A library to compare: its meta-gradient function (None unless loaded), its status, and how it
    was loaded or why not."""
    fn: Callable | None
    status: str  # LOADED, NOT_INSTALLED or IMPORT_FAILED
    how: str


LOADED, NOT_INSTALLED, IMPORT_FAILED = "loaded", "not installed", "import failed"


def not_compared() -> dict[str, str]:
    """Peers named in the output but never compared, and why (Betty: as found by running it)."""
    try:
        from benchmarks.peers_betty import unrolled_failure

        why = unrolled_failure() or "its unrolled problems run; not yet compared here"
    except ImportError as err:
        why = (f"not installed ({one_line(err)}); .ci/run installs betty-ml 0.2.1" if err.name == "betty"
               else f"import failed ({one_line(err)})")
    except Exception as err:  # noqa: BLE001 - installed but its import breaks (a dependency, higher, included)
        why = f"import failed ({one_line(err)})"
    return {"betty": why}


def load_peer(name: str, load: Callable[[], tuple[Callable, str]]) -> Peer:
    """A peer, loaded; or not installed (the import of the package itself finds nothing); or its import
    failed (any other error, a dependency of the package that is missing included)."""
    try:
        fn, how = load()
    except ImportError as err:
        if err.name == name and not _installed(name):
            return Peer(None, NOT_INSTALLED, f"not installed ({one_line(err)})")
        return Peer(None, IMPORT_FAILED, f"import failed ({one_line(err)})")
    except Exception as err:  # noqa: BLE001 - installed but broken: an error, reported as one
        return Peer(None, IMPORT_FAILED, f"import failed ({one_line(err)})")
    return Peer(fn, LOADED, how)


def _installed(name: str) -> bool:
    if name in sys.modules:  # None there: its import is blocked, as for a package that is not installed
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def _imported(name: str, wrap: Callable) -> Callable[[], tuple[Callable, str]]:
    def load():
        module = importlib.import_module(name)
        return wrap(module), f"import {name} {getattr(module, '__version__', '')}".strip()

    return load


def _learn2learn() -> tuple[Callable, str]:
    MAML, how = load_learn2learn()
    return learn2learn_step(MAML), how


def peers() -> dict[str, Peer]:
    """{name: Peer} for learn2learn, higher and TorchOpt."""
    return {"learn2learn": load_peer("learn2learn", _learn2learn),
            "higher": load_peer("higher", _imported("higher", higher_step)),
            "torchopt": load_peer("torchopt", _imported("torchopt", torchopt_step))}


# ----------------------------------------------------------- written for the benchmark: torch alone, no library
# Two implementations a user could write without any library, sharing no code with distmaml's engine: the
# per-task loop of torch.autograd.grad, and every task at once on stacked weights (a task dimension first).


def plain_loop_step(model, batch, loss_fn, lr, steps, first_order, _):
    """MAML with torch.autograd.grad alone, task by task: the graph kept for the second order; each task's
    query loss back-propagated into the shared weights at once, so that one task's graph is held at a time."""
    theta = dict(model.named_parameters())
    for i in range(batch.num_tasks):
        weights = theta
        for _ in range(steps):
            loss = loss_fn(functional_call(model, weights, (batch.support_x[i],)), batch.support_y[i])
            grads = torch.autograd.grad(loss, list(weights.values()), create_graph=not first_order)
            weights = {name: value - lr * grad for (name, value), grad in zip(weights.items(), grads)}
        loss_fn(functional_call(model, weights, (batch.query_x[i],)), batch.query_y[i]).backward()


def hand_batched_step(model, batch, loss_fn, lr, steps, first_order, _):
    """MAML on stacked weights: each weight expanded to [tasks, ...], the network run for every task at once
    (stacked_forward), and the tasks' gradients in one torch.autograd.grad of the sum of their losses: tasks
    share no weights, so slice i of the gradient is task i's own."""
    forward = stacked_forward(model)
    weights = {name: value.expand(batch.num_tasks, *value.shape) for name, value in model.named_parameters()}
    for _ in range(steps):
        loss = summed_over_tasks(loss_fn, forward(weights, batch.support_x), batch.support_y)
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=not first_order)
        weights = {name: value - lr * grad for (name, value), grad in zip(weights.items(), grads)}
    summed_over_tasks(loss_fn, forward(weights, batch.query_x), batch.query_y).backward()


def summed_over_tasks(loss_fn, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The sum over tasks of `loss_fn` (a mean over one task's examples), predictions and targets with a task
    dimension first. Every task has as many examples, so one call on all their examples is the mean over
    tasks; times the number of tasks, the sum."""
    return prediction.shape[0] * loss_fn(prediction.flatten(0, 1), target.flatten(0, 1))


def stacked_forward(model: nn.Module) -> Callable[[dict[str, torch.Tensor], torch.Tensor], torch.Tensor]:
    """forward(weights, x): `model` run for every task at once on its weights stacked [tasks, ...], inputs
    [tasks, n, ...] (or [n, ...], the same for every task), predictions [tasks, n, ...]."""
    if isinstance(model, MLP):
        return functools.partial(_stacked_mlp, model)
    if isinstance(model, Conv4):
        return functools.partial(_stacked_conv4, model)
    raise NotImplementedError(f"no stacked forward for {type(model).__name__}")


def _has_weights(layer: nn.Module) -> bool:
    return any(True for _ in layer.parameters())


def _stacked_mlp(model: MLP, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """The MLP's nn.Sequential layer by layer: one baddbmm per Linear, its activations as they are
    (elementwise, so the task dimension passes through)."""
    tasks = next(iter(weights.values())).shape[0]
    hidden = x if x.dim() == 3 else x.expand(tasks, *x.shape)
    for index, layer in model.net.named_children():
        if isinstance(layer, nn.Linear):
            weight, bias = weights[f"net.{index}.weight"].transpose(1, 2), weights.get(f"net.{index}.bias")
            hidden = torch.bmm(hidden, weight) if bias is None else torch.baddbmm(bias.unsqueeze(1), hidden, weight)
        elif _has_weights(layer):  # a learned activation: its weights are phi's, not the task's
            raise NotImplementedError(f"{type(layer).__name__} has weights: no stacked form here")
        else:
            hidden = layer(hidden)
    return hidden


def _stacked_conv4(model: Conv4, weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Conv-4 with the tasks' channels side by side, [n, tasks * channels, h, w]: one grouped convolution
    (groups = tasks) per layer; BatchStatNorm2d's per-channel batch statistics are then per task and channel,
    and the model's own module runs on its weights flattened the same way; the classifier one baddbmm."""
    tasks, examples = x.shape[:2]
    hidden = x.transpose(0, 1).flatten(1, 2)
    for index, layer in model.features.named_children():
        name = f"features.{index}."
        if isinstance(layer, nn.Conv2d) and layer.groups == 1:
            kernel = weights[name + "weight"].flatten(0, 1)
            bias = weights[name + "bias"].flatten() if layer.bias is not None else None
            hidden = F.conv2d(hidden, kernel, bias, layer.stride, layer.padding, layer.dilation, groups=tasks)
        elif isinstance(layer, BatchStatNorm2d):
            hidden = functional_call(layer, {"weight": weights[name + "weight"].flatten(),
                                             "bias": weights[name + "bias"].flatten()}, (hidden,))
        elif isinstance(layer, nn.Flatten):  # each task's features channel-major, as the model flattens one task
            hidden = hidden.reshape(examples, tasks, -1).transpose(0, 1)
        elif _has_weights(layer):
            raise NotImplementedError(f"{type(layer).__name__} has weights: no stacked form here")
        else:  # ReLU, max-pooling: per channel, so per task
            hidden = layer(hidden)
    return torch.baddbmm(weights["classifier.bias"].unsqueeze(1), hidden, weights["classifier.weight"].transpose(1, 2))


PLAIN_LOOP, HAND_BATCHED = "plain-loop", "hand-batched"
WRITTEN_HERE = {PLAIN_LOOP: "plain torch.autograd.grad, per task (written for the benchmark, no library)",
                HAND_BATCHED: "stacked weights [tasks, ...], one baddbmm per linear layer and one grouped convolution "
                              "(groups = tasks) per convolution, autograd of the summed loss (written for the "
                              "benchmark, no library)"}


def written_here() -> dict[str, Peer]:
    """The two implementations written for the benchmark, as peers that are always loaded."""
    return {name: Peer(fn, LOADED, WRITTEN_HERE[name])
            for name, fn in ((PLAIN_LOOP, plain_loop_step), (HAND_BATCHED, hand_batched_step))}


# --------------------------------------------------------------------------------------- cases


def problem(kind: str, dtype: torch.dtype, more: tuple[str, ...] = ()):
    """(model, family, config) of a benchmark task, the model's weights the same for every library; `more`:
    further overrides (the tests' smaller networks)."""
    overrides = ["train.meta_batch=25"] if kind == "sine" else [*OMNIGLOT_SHAPED, "train.meta_batch=8"]
    config = config_for(SINE, [*overrides, *more,
                               "engine.dtype=" + ("float64" if dtype == torch.float64 else "float32")])
    torch.manual_seed(0)
    learner = build(config)
    return learner.model, learner.family, config


def distmaml_grads(model, batch, loss_fn, lr, steps, first_order, rule="sgd", **settings):
    theta = dict(model.named_parameters())
    inner = Inner(make_rule(rule, lr, steps, **settings), steps, "first_order" if first_order else "second_order")
    for param, grad in zip(theta.values(), meta_gradient(MAML(model, loss_fn), theta, batch, inner).grad_sum.values()):
        param.grad = grad


def distmaml_loop_grads(model, batch, loss_fn, lr, steps, first_order, rule="sgd", **settings):
    """distmaml's per-task loop (engine.batched=false; what engine.batched=auto takes where it is faster)."""
    theta = dict(model.named_parameters())
    inner = Inner(make_rule(rule, lr, steps, **settings), steps, "first_order" if first_order else "second_order")
    found = meta_gradient_loop(MAML(model, loss_fn), theta, batch, inner).grad_sum.values()
    for param, grad in zip(theta.values(), found):
        param.grad = grad


def gradient_of(fn, model, batch, loss_fn, lr, steps, first_order, extra) -> torch.Tensor:
    for param in model.parameters():
        param.grad = None
    fn(model, batch, loss_fn, lr, steps, first_order, extra)
    return torch.cat([param.grad.reshape(-1) for param in model.parameters()])


def compare_and_time(kind: str, steps: int, first_order: bool, libraries, windows: int, seconds: float,
                     rule: str = "sgd", more: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    lr = 0.01 if kind == "sine" else 0.4
    settings = {}
    if rule == "adam":
        # higher 0.2.1 scales the step by sqrt(1 - beta2^t) and adds epsilon to sqrt(v) (the Adam paper's
        # epsilon-hat form); torch.optim.Adam and distmaml add it to sqrt(v / (1 - beta2^t)). With a
        # negligible epsilon both are the same function, so their meta-gradients can be compared.
        lr, settings = 0.001, {"eps": 1e-30}
    inner_optimizer = (lambda params, lr: torch.optim.Adam(params, lr=lr, **settings)) if rule == "adam" else (
        lambda params, lr: torch.optim.SGD(params, lr=lr))
    exact_model, family64, config = problem(kind, torch.float64, more)
    batch64 = family64.sample(STREAM_TRAIN, 0, torch.arange(config.train.meta_batch))
    loss_fn = family64.loss
    reference = gradient_of(lambda *a: distmaml_grads(*a[:6], rule=rule, **settings), exact_model, batch64, loss_fn,
                            lr, steps, first_order, None)
    rows = []
    ours = {"distmaml": Peer(None, LOADED, "distmaml.meta.meta_gradient (batched)"),
            "distmaml-loop": Peer(None, LOADED, "distmaml.meta.meta_gradient_loop (engine.batched=false)")}
    for name, (fn, status, how) in {**ours, **libraries}.items():
        row = {"kind": kind, "inner_steps": steps, "order": "first" if first_order else "second", "rule": rule,
               "library": name, "loaded": how, "meta_batch": config.train.meta_batch, "inner_settings": settings}
        if status != LOADED:
            rows.append({**row, "status": status})
            continue
        own = {"distmaml": distmaml_grads, "distmaml-loop": distmaml_loop_grads}.get(name)
        compute = (lambda *a, own=own: own(*a[:6], rule=rule, **settings)) if own else fn
        got = gradient_of(compute, copy.deepcopy(exact_model), batch64, loss_fn, lr, steps, first_order,
                          inner_optimizer)
        error = float((got - reference).norm() / reference.norm())
        row.update(relative_error=error, status="equal" if error <= TOLERANCE else "DIFFERS")
        if error > TOLERANCE:  # not the same computation: its time would mean nothing
            rows.append(row)
            continue
        model, family, config32 = problem(kind, torch.float32, more)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        counter = iter(range(10 ** 9))

        def iteration():
            batch = family.sample(STREAM_TRAIN, next(counter), torch.arange(config32.train.meta_batch))
            for param in model.parameters():
                param.grad = None
            compute(model, batch, family.loss, lr, steps, first_order, inner_optimizer)
            optimizer.step()

        iteration()
        row["ms_per_iteration"] = 1e3 * median_seconds(iteration, windows, seconds)
        rows.append(row)
        print(f"{kind:>8} K={steps:<3} {row['order']:>6} {rule:>5} {name:>12}: rel. error {error:.1e}, "
              f"{row['ms_per_iteration']:9.2f} ms", flush=True)
    mine = next(r for r in rows if r["library"] == "distmaml")
    for row in rows:
        if "ms_per_iteration" in row:
            row["distmaml_speedup"] = row["ms_per_iteration"] / mine["ms_per_iteration"]
    mine.update(against_loops_and_hand_batched(rows, mine))
    return rows


def against_loops_and_hand_batched(rows: list[dict[str, Any]], mine: dict[str, Any]) -> dict[str, float]:
    """distmaml's time against the fastest per-task loop (a library's or the plain loop) and against the
    hand-batched implementation, where they were timed."""
    timed = {row["library"]: row["ms_per_iteration"] for row in rows if "ms_per_iteration" in row}
    loops = [ms for name, ms in timed.items() if name not in ("distmaml", "distmaml-loop", HAND_BATCHED)]
    out = {}
    if loops:
        out["speedup_over_fastest_loop"] = min(loops) / mine["ms_per_iteration"]
        if "distmaml-loop" in timed:  # the faster of distmaml's two paths: what engine.batched=auto runs
            out["auto_speedup_over_fastest_loop"] = min(loops) / min(timed["distmaml"], timed["distmaml-loop"])
    if HAND_BATCHED in timed:
        out["speed_vs_hand_batched"] = timed[HAND_BATCHED] / mine["ms_per_iteration"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--kinds", nargs="+", default=["sine", "conv4"])
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/peers_cpu.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    libraries, rows, started = peers(), [], time.time()
    for name, peer in libraries.items():
        print(f"{name}: {peer.how}", flush=True)
    compared = {**libraries, **written_here()}
    skipped = not_compared()
    for name, why in skipped.items():
        print(f"{name}: {why}", flush=True)
    for kind in args.kinds:
        for first_order in (False, True):
            for steps in args.steps:
                rows += compare_and_time(kind, steps, first_order, compared, args.windows, args.seconds)
    # Differentiable Adam inner steps: higher's DifferentiableAdam is the one peer that has them.
    adam_peers = {"higher": libraries["higher"]}
    rows += compare_and_time("sine", 5, False, adam_peers, args.windows, args.seconds, rule="adam")
    result = {"benchmark": "peers", "command": " ".join(["python -m benchmarks.peers", *(argv or sys.argv[1:])]),
              "machine": machine(torch.device("cpu")), "tolerance": TOLERANCE,
              "libraries": {name: peer.how for name, peer in libraries.items()}, "written_here": WRITTEN_HERE,
              "not_compared": skipped,
              "wall_seconds": time.time() - started, "rows": rows}
    out = write(result, args.out or RESULTS / "peers_cpu.json")
    print(f"wrote {out}")
    broken = [f"{name}: {peer.how}" for name, peer in libraries.items() if peer.status == IMPORT_FAILED]
    if broken:  # installed but unusable: the comparison this benchmark exists for did not happen
        raise SystemExit("python -m benchmarks.peers: error: " + "; ".join(broken))
    return result


if __name__ == "__main__":
    main()
