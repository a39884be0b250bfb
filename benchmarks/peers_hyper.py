"""Hyperparameter and learned-data hypergradients against TorchOpt, higher and Betty: equal first, then time and memory.

    python -m benchmarks.peers_hyper                   # every case, the memory rows, this CPU
    python -m benchmarks.peers_hyper --only learning_rate --quick

Four problems, each over 16 random initialisations (tasks): two on MNIST-1D (the 40-100-100-10 MLP), two on
scikit-learn's digits:

- learning_rate: the hypergradient of the validation loss with respect to the log learning rate of
  T = 100 SGD steps (batch 100), unrolled and exact. distmaml: one batched meta_gradient; TorchOpt:
  its functional SGD (torchopt.sgd with the rate as a tensor) unrolled per initialisation; higher:
  innerloop_ctx with the rate overridden by a tensor, per initialisation.
- weight_decay: the implicit hypergradient of one L2 decay per weight after 100 full-batch gradient
  steps (plain SGD steps, as the peers take them: implicit.inner_safeguard=false): (H + I) v =
  grad L_val by 20 conjugate-gradient iterations. distmaml: Implicit(CG); TorchOpt:
  torchopt.diff.implicit.custom_root with linear_solve.solve_cg (ridge 1, 20 iterations) per
  initialisation. higher has no implicit differentiation. Betty: an ImplicitProblem per
  initialisation, its Neumann series H^-1 v ~ alpha sum_j (I - alpha H)^j v (20 terms) against
  distmaml's Neumann, and its "cg" against distmaml's CG without a ridge (benchmarks/peers_betty.py).
- distill (scikit-learn's digits, a 64-64-10 MLP): the hypergradient of the loss on a real batch with
  respect to 10 distilled images, their soft labels and a learned rate for each of T = 30 steps,
  unrolled. TorchOpt: torchopt.sgd with the step's rate from a schedule; higher: one override of the
  rate per step. Betty's unrolled problems do not start (its rows give the error).
- hyperclean (digits, half the labels flipped): the implicit hypergradient of the clean validation
  loss with respect to one weight per training example, as weight_decay.

Beside the libraries, two implementations written for the benchmark with torch alone, in every case:
- plain-loop: the per-initialisation loop a user writes with torch.autograd.grad (the graph kept for
  the unrolled cases); for the implicit ones, plain SGD steps without a graph, then per
  initialisation the ridge-1 CG solve of 20 iterations with Hessian-vector products by double
  backward, and the mixed product for phi's gradient (TorchOpt's solve, the same numbers).
- hand-batched: the same on stacked weights [tasks, out, in], one baddbmm per linear layer, the MLP's
  activations as they are, and the tasks' gradients (and Hessian-vector products, for the batched
  CG) from autograd of the sum of their losses: tasks share no weights, so slice i is task i's own.
Each distmaml row has speedup_over_fastest_peer (the fastest library's time / distmaml's),
speedup_over_fastest_loop (the same of the fastest per-initialisation loop, a library or the plain
loop) and speed_vs_hand_batched (the hand-batched time / distmaml's), each against rows of its own solve.

Every implementation gets the same initial weights and mini-batches (drawn by distmaml's problem, a pure
function of each task's key). Their hypergradients must agree with distmaml's to 1e-6 relative in
float64 before anything is timed; one that differs is reported and not timed. Times are
medians of --windows windows in float32 on one thread. The memory rows run the learning-rate case
at T = 1,000 and the distillation case at T = 300 in a fresh process per library and report the
peak resident memory above the process's baseline, and the same at T = 1: the difference is the
unroll's own memory. distmaml recomputes the unroll in sqrt(T) segments (inner.checkpoint=auto),
the peers store it (the plain loop one initialisation's at a time).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import torch
import torch.nn.functional as F
from torch.func import functional_call

from benchmarks.common import REPO, RESULTS, fresh_process, machine, median_seconds, write
from benchmarks.peers import HAND_BATCHED, PLAIN_LOOP, WRITTEN_HERE, stacked_forward, summed_over_tasks
from benchmarks.peers_betty import PeerFailed
from distmaml.build import build
from distmaml.config import load_config
from distmaml.meta import CG, Implicit, Inner, NeumannSeries, meta_gradient, meta_gradient_loop, task_at
from distmaml.meta.problems.distillation import INPUTS, LABELS, LANE_OUTER
from distmaml.meta.problems.reweighting import NAME as EXAMPLE_LOGIT

TOLERANCE = 1e-6
TASKS = 16
CASES = {
    "learning_rate": ("configs/mnist1d_lr.yaml", ["inner.steps=100", "inner.lr=0.1", "training_run.outer=loss"]),
    "weight_decay": ("configs/mnist1d_weight_decay.yaml", ["inner.steps=100", "implicit.damping=1.0",
                                                          "implicit.inner_safeguard=false"]),
    "distill": ("configs/digits_distill.yaml", ["inner.steps=30"]),
    "hyperclean": ("configs/digits_hyperclean.yaml", ["inner.mode=implicit", "implicit.damping=1.0",
                                                      "implicit.inner_safeguard=false"]),
}


def setup(case: str, dtype: str, steps: int | None = None, checkpoint: str = "none", tasks: int = TASKS,
          more: tuple[str, ...] = ()):
    """(config, learner, tasks) of a case; `more`: further overrides (the tests' smaller data)."""
    path, overrides = CASES[case]
    extra = [f"inner.steps={steps}", *more] if steps else list(more)
    if steps and case == "distill":  # a learned step size per inner step (Wang et al.), as the peers index it
        extra.append(f"inner.schedule_blocks={steps}")
    config = load_config(REPO / path, [*overrides, *extra, f"engine.dtype={dtype}", f"inner.checkpoint={checkpoint}",
                                       f"train.meta_batch={tasks}"])
    torch.manual_seed(0)
    learner = build(config)
    return config, learner, learner.family.sample(0, 0, torch.arange(tasks))


# The implicit cases' linear solves, each a fixed number of iterations as the peers run them: TorchOpt's
# ridge-1 CG, and Betty's Neumann series and its "cg" (neither damped; NEUMANN_ALPHA times the Hessian's
# largest eigenvalue stays below 2 on both data sets).
NEUMANN_ALPHA = 0.01
# Plain SGD inner steps, as the peers take them (no safeguard).
SOLVES = {"cg": Implicit(CG(cg_steps=20, cg_tol=0.0), damping=1.0, safeguard=False),
          "neumann": Implicit(NeumannSeries(terms=20, alpha=NEUMANN_ALPHA), damping=0.0, safeguard=False),
          "cg-undamped": Implicit(CG(cg_steps=20, cg_tol=0.0), damping=0.0, safeguard=False)}


def distmaml_grad(config, learner, tasks, solve: str = "cg") -> torch.Tensor:
    inner = learner.inner
    if isinstance(inner.method, Implicit):
        inner = Inner(inner.rule, inner.steps, SOLVES[solve])
    result = meta_gradient(learner.problem, learner.theta, tasks, inner)
    return torch.cat([g.reshape(-1) for g in result.grad_sum.values()])


def distmaml_neumann(config, learner, tasks) -> torch.Tensor:
    return distmaml_grad(config, learner, tasks, "neumann")


def distmaml_loop(config, learner, tasks) -> torch.Tensor:
    """distmaml's per-task loop (engine.batched=false; what engine.batched=auto takes where it is faster)."""
    inner = learner.inner
    if isinstance(inner.method, Implicit):
        inner = Inner(inner.rule, inner.steps, SOLVES["cg"])
    result = meta_gradient_loop(learner.problem, learner.theta, tasks, inner)
    return torch.cat([g.reshape(-1) for g in result.grad_sum.values()])


def _runs(learner, tasks):
    problem = learner.problem
    names = list(problem.inner_template())
    for i in range(tasks["seed"].shape[0]):
        task = task_at(tasks, i)
        start = problem.start({}, task)
        yield task, tuple(start[name].detach().clone().requires_grad_() for name in names), names


def torchopt_lr(config, learner, tasks) -> torch.Tensor:
    import torchopt

    problem = learner.problem
    log_lr = learner.theta["inner.lr.log_schedule"].detach().clone().requires_grad_()
    total = 0.0
    for task, params, names in _runs(learner, tasks):
        optimizer = torchopt.sgd(lr=lambda count: log_lr[0].exp())
        state = optimizer.init(params)
        for step in range(config.inner.steps):
            x, y = problem.batch(task, step)
            loss = problem.loss_fn(functional_call(problem.model, dict(zip(names, params)), (x,)), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            updates, state = optimizer.update(grads, state, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        total = total + problem.loss_fn(functional_call(problem.model, dict(zip(names, params)),
                                                        (problem.data.val_x,)), problem.data.val_y)
    return torch.autograd.grad(total, log_lr)[0]


def _starting_at(model, params):
    """`model` with its weights set to one task's starting weights: higher adapts a module, not a dict."""
    with torch.no_grad():
        for value, start in zip(model.parameters(), params):
            value.copy_(start)
    return model


def higher_lr(config, learner, tasks) -> torch.Tensor:
    import higher

    problem = learner.problem
    log_lr = learner.theta["inner.lr.log_schedule"].detach().clone().requires_grad_()
    model = problem.to("cpu").model
    total = 0.0
    for task, params, names in _runs(learner, tasks):
        optimizer = torch.optim.SGD(_starting_at(model, params).parameters(), lr=config.inner.lr)
        with higher.innerloop_ctx(model, optimizer, copy_initial_weights=True,
                                  override={"lr": [log_lr[0].exp()]}) as (functional, differentiable):
            for step in range(config.inner.steps):
                x, y = problem.batch(task, step)
                differentiable.step(problem.loss_fn(functional(x), y))
            total = total + problem.loss_fn(functional(problem.data.val_x), problem.data.val_y)
    return torch.autograd.grad(total, log_lr)[0]


def torchopt_distill(config, learner, tasks) -> torch.Tensor:
    import torchopt

    problem, phi = learner.problem, learner.theta
    meta = {name: value.detach().clone().requires_grad_() for name, value in phi.items()}
    rates = meta["inner.lr.log_schedule"]
    total = 0.0
    for task, params, names in _runs(learner, tasks):
        optimizer = torchopt.sgd(lr=lambda count: rates[int(count)].exp())
        state = optimizer.init(params)
        for step in range(config.inner.steps):
            loss = problem.inner_loss(dict(zip(names, params)), meta, task, step)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            updates, state = optimizer.update(grads, state, inplace=False)
            params = torchopt.apply_updates(params, updates, inplace=False)
        total = total + problem.outer_loss(dict(zip(names, params)), meta, task)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, list(meta.values()))])


def higher_distill(config, learner, tasks) -> torch.Tensor:
    import higher

    problem, phi = learner.problem, learner.theta
    meta = {name: value.detach().clone().requires_grad_() for name, value in phi.items()}
    model = problem.to("cpu").model
    total = 0.0
    for task, params, names in _runs(learner, tasks):
        optimizer = torch.optim.SGD(_starting_at(model, params).parameters(), lr=config.inner.lr)
        with higher.innerloop_ctx(model, optimizer, copy_initial_weights=True) as (functional, differentiable):
            for step in range(config.inner.steps):
                target = torch.softmax(meta["synthetic.label_logits"], -1)
                loss = -(target * torch.log_softmax(functional(meta["synthetic.x"]), -1)).sum(-1).mean()
                differentiable.step(loss, override={"lr": [meta["inner.lr.log_schedule"][step].exp()]})
            index = problem.batch_index(task, 0, lane=LANE_OUTER)
            total = total + problem.loss_fn(functional(problem.data.train_x[index]), problem.data.train_y[index])
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, list(meta.values()))])


def torchopt_implicit(config, learner, tasks) -> torch.Tensor:
    import torchopt

    problem = learner.problem
    phi_names = list(learner.theta)
    decays = tuple(learner.theta[name].detach().clone().requires_grad_() for name in phi_names)
    lr = config.inner.lr

    def inner_loss(params, meta, names):
        weights = dict(zip(names, params))
        return problem.inner_loss(weights, dict(zip(phi_names, meta)), None, 0)

    total = 0.0
    for task, params, names in _runs(learner, tasks):
        def optimality(params, meta):  # TorchOpt differentiates it with torch.func: written with torch.func.grad
            return torch.func.grad(lambda p: inner_loss(p, meta, names))(params)

        @torchopt.diff.implicit.custom_root(optimality, argnums=1,
                                            solve=torchopt.linear_solve.solve_cg(ridge=1.0, maxiter=20, rtol=0.0))
        def solve(params, meta):
            params = tuple(p.detach().requires_grad_() for p in params)
            with torch.enable_grad():  # custom_root runs the solver inside an autograd Function's forward
                for _ in range(config.inner.steps):
                    grads = torch.autograd.grad(inner_loss(params, meta, names), params)
                    params = tuple((p - lr * g).detach().requires_grad_() for p, g in zip(params, grads))
            return params

        solution = solve(params, decays)
        total = total + problem.loss_fn(functional_call(problem.model, dict(zip(names, solution)),
                                                        (problem.data.val_x,)), problem.data.val_y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(total, decays)])


# ----------------------------------------------------------- written for the benchmark: torch alone, no library
# A per-initialisation loop of plain torch.autograd.grad ("plain-loop"), and every initialisation at once on
# stacked weights [tasks, ...] ("hand-batched": one baddbmm per linear layer, the tasks' gradients from one
# autograd call on the sum of their losses, as tasks share no weights). Neither shares code with distmaml's
# engine; both read the problem's data, model and losses as the library peers above do.


def plain_lr(config, learner, tasks) -> torch.Tensor:
    problem = learner.problem
    log_lr = learner.theta["inner.lr.log_schedule"].detach().clone().requires_grad_()
    hypergradient = torch.zeros_like(log_lr)
    for task, params, names in _runs(learner, tasks):
        rate = log_lr[0].exp()  # in each initialisation's graph: each backward frees its own
        for step in range(config.inner.steps):
            x, y = problem.batch(task, step)
            loss = problem.loss_fn(functional_call(problem.model, dict(zip(names, params)), (x,)), y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
            params = tuple(p - rate * g for p, g in zip(params, grads))
        outer = problem.loss_fn(functional_call(problem.model, dict(zip(names, params)), (problem.data.val_x,)),
                                problem.data.val_y)
        # one initialisation's backward at a time: its unroll is freed before the next one is built
        hypergradient += torch.autograd.grad(outer, log_lr)[0]
    return hypergradient


def plain_distill(config, learner, tasks) -> torch.Tensor:
    problem = learner.problem
    meta = {name: value.detach().clone().requires_grad_() for name, value in learner.theta.items()}
    rates = meta["inner.lr.log_schedule"]
    hypergradient = [torch.zeros_like(value) for value in meta.values()]
    for task, params, names in _runs(learner, tasks):
        for step in range(config.inner.steps):
            grads = torch.autograd.grad(problem.inner_loss(dict(zip(names, params)), meta, task, step), params,
                                        create_graph=True)
            params = tuple(p - rates[step].exp() * g for p, g in zip(params, grads))
        outer = problem.outer_loss(dict(zip(names, params)), meta, task)
        hypergradient = [h + g for h, g in zip(hypergradient, torch.autograd.grad(outer, list(meta.values())))]
    return torch.cat([g.reshape(-1) for g in hypergradient])


def conjugate_gradient(matvec, rhs: list[torch.Tensor], iterations: int, dot) -> list[torch.Tensor]:
    """`iterations` CG steps from zero with no early stop (TorchOpt's solve_cg at rtol 0). `dot`: the inner
    product, one number for one task, or one per task (a tensor [tasks]) for stacked ones, each task's
    scalars then scaling its own slice."""
    def scaled(scalar, tensor):
        return scalar.reshape(scalar.shape + (1,) * (tensor.dim() - scalar.dim())) * tensor

    solution = [torch.zeros_like(b) for b in rhs]
    residual, direction = list(rhs), list(rhs)
    residual_norm = dot(residual, residual)
    for _ in range(iterations):
        product = matvec(direction)
        alpha = residual_norm / dot(direction, product)
        solution = [x + scaled(alpha, p) for x, p in zip(solution, direction)]
        residual = [r - scaled(alpha, q) for r, q in zip(residual, product)]
        new_norm = dot(residual, residual)
        direction = [r + scaled(new_norm / residual_norm, p) for r, p in zip(residual, direction)]
        residual_norm = new_norm
    return solution


def _dot(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).sum() for x, y in zip(a, b))


def _dot_per_task(a: list[torch.Tensor], b: list[torch.Tensor]) -> torch.Tensor:
    return sum((x * y).flatten(1).sum(1) for x, y in zip(a, b))


def implicit_hypergradient(inner_grads, weights, phi, outer, dot) -> list[torch.Tensor]:
    """-(d inner_grads / d phi)^T v with (H + ridge I) v = grad_w outer, H v by double backward: the implicit
    function theorem's hypergradient, solved as SOLVES["cg"] solves it (TorchOpt's ridge and iterations).
    `inner_grads`: the inner loss's gradient at the trained weights, with its graph."""
    cg = SOLVES["cg"]
    rhs = torch.autograd.grad(outer, weights)

    def matvec(v):
        products = torch.autograd.grad(inner_grads, weights, v, retain_graph=True)
        return [hv + cg.damping * x for hv, x in zip(products, v)]

    v = conjugate_gradient(matvec, list(rhs), cg.solve.cg_steps, dot)
    mixed = torch.autograd.grad(inner_grads, phi, v, allow_unused=True)
    return [torch.zeros_like(p) if m is None else -m for p, m in zip(phi, mixed)]


def plain_implicit(config, learner, tasks) -> torch.Tensor:
    problem = learner.problem
    phi = {name: value.detach().clone().requires_grad_() for name, value in learner.theta.items()}
    frozen = {name: value.detach() for name, value in phi.items()}  # the training run itself needs no graph
    steps, hypergradient = config.inner.steps, [torch.zeros_like(value) for value in phi.values()]
    for task, params, names in _runs(learner, tasks):
        for step in range(steps):  # plain SGD steps, as the peers take them
            grads = torch.autograd.grad(problem.inner_loss(dict(zip(names, params)), frozen, task, step), params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(config.inner.lr * g)
        inner = problem.inner_loss(dict(zip(names, params)), phi, task, max(steps - 1, 0))
        inner_grads = torch.autograd.grad(inner, params, create_graph=True)
        outer = problem.loss_fn(functional_call(problem.model, dict(zip(names, params)), (problem.data.val_x,)),
                                problem.data.val_y)
        task_grads = implicit_hypergradient(inner_grads, params, list(phi.values()), outer, _dot)
        hypergradient = [h + g for h, g in zip(hypergradient, task_grads)]
    return torch.cat([g.reshape(-1) for g in hypergradient])


def _stacked_runs(learner, tasks) -> tuple[list, dict[str, torch.Tensor]]:
    """(each task, the tasks' starting weights stacked {name: [tasks, ...]}, leaves that track their gradient)."""
    runs = list(_runs(learner, tasks))
    names = runs[0][2]
    stacked = {name: torch.stack([params[j].detach() for _, params, _ in runs]).requires_grad_()
               for j, name in enumerate(names)}
    return [task for task, _, _ in runs], stacked


def _every_task(target: torch.Tensor, tasks: int) -> torch.Tensor:
    """Targets shared by every task, with a task dimension (a view)."""
    return target.expand(tasks, *target.shape)


def _stacked_index(problem, tasks: list, step: int, **lane) -> torch.Tensor | None:
    """The indices of step `step`'s training examples of every task, [tasks, batch], or None where the
    problem trains on the whole training split."""
    indices = [problem.batch_index(task, step, **lane) for task in tasks]
    return None if indices[0] is None else torch.stack(indices)


def _examples(problem, index: torch.Tensor | None, tasks: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The training examples at `index` ([tasks, batch, ...], one gather), or the whole training split with
    a task dimension (views)."""
    if index is None:
        return _every_task(problem.data.train_x, tasks), _every_task(problem.data.train_y, tasks)
    return problem.data.train_x[index], problem.data.train_y[index]


def _stacked_batch(problem, tasks: list, step: int, **lane) -> tuple[torch.Tensor, torch.Tensor]:
    return _examples(problem, _stacked_index(problem, tasks, step, **lane), len(tasks))


def _validation_loss(problem, weights: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum over tasks of the validation loss of their stacked weights."""
    tasks = next(iter(weights.values())).shape[0]
    return summed_over_tasks(problem.loss_fn, stacked_forward(problem.model)(weights, problem.data.val_x),
                             _every_task(problem.data.val_y, tasks))


def hand_batched_lr(config, learner, tasks) -> torch.Tensor:
    problem = learner.problem
    log_lr = learner.theta["inner.lr.log_schedule"].detach().clone().requires_grad_()
    forward, rate = stacked_forward(problem.model), log_lr[0].exp()
    runs, weights = _stacked_runs(learner, tasks)
    for step in range(config.inner.steps):
        x, y = _stacked_batch(problem, runs, step)
        loss = summed_over_tasks(problem.loss_fn, forward(weights, x), y)
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
        weights = {name: w - rate * g for (name, w), g in zip(weights.items(), grads)}
    return torch.autograd.grad(_validation_loss(problem, weights), log_lr)[0]


def hand_batched_distill(config, learner, tasks) -> torch.Tensor:
    problem = learner.problem
    meta = {name: value.detach().clone().requires_grad_() for name, value in learner.theta.items()}
    forward, rates = stacked_forward(problem.model), meta["inner.lr.log_schedule"]
    runs, weights = _stacked_runs(learner, tasks)
    target = torch.softmax(meta[LABELS], -1)  # the soft labels, as higher_distill writes the inner loss
    for step in range(config.inner.steps):
        loss = -(target * torch.log_softmax(forward(weights, meta[INPUTS]), -1)).sum(-1).mean(-1).sum()
        grads = torch.autograd.grad(loss, list(weights.values()), create_graph=True)
        weights = {name: w - rates[step].exp() * g for (name, w), g in zip(weights.items(), grads)}
    x, y = _stacked_batch(problem, runs, 0, lane=LANE_OUTER)  # the real batch of the outer loss
    outer = summed_over_tasks(problem.loss_fn, forward(weights, x), y)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(outer, list(meta.values()))])


def _decayed_loss(problem, weights, phi, tasks, step) -> torch.Tensor:
    """weight_decay's inner loss summed over tasks: the training loss plus 1/2 sum decay * w^2 (the decay of
    each weight broadcast over the task dimension)."""
    x, y = _stacked_batch(problem, tasks, step)
    loss = summed_over_tasks(problem.loss_fn, stacked_forward(problem.model)(weights, x), y)
    return loss + 0.5 * sum((decay * weights[name] ** 2).sum() for name, decay in problem.decays(phi).items())


def _reweighted_loss(problem, weights, phi, tasks, step) -> torch.Tensor:
    """hyperclean's inner loss summed over tasks: each example's cross-entropy weighted by sigmoid(its logit),
    divided by the total weight (or averaged, unnormalised)."""
    index = _stacked_index(problem, tasks, step)
    x, y = _examples(problem, index, len(tasks))
    logits = stacked_forward(problem.model)(weights, x)
    per_example = F.cross_entropy(logits.flatten(0, 1), y.flatten(0, 1), reduction="none").reshape(y.shape)
    weight = torch.sigmoid(phi[EXAMPLE_LOGIT] if index is None else phi[EXAMPLE_LOGIT][index])
    if problem.normalised:
        return ((weight * per_example).sum(-1) / weight.sum(-1)).sum()
    return (weight * per_example).mean(-1).sum()


def _hand_batched_implicit(stacked_inner_loss):
    def run(config, learner, tasks) -> torch.Tensor:
        problem = learner.problem
        phi = {name: value.detach().clone().requires_grad_() for name, value in learner.theta.items()}
        frozen = {name: value.detach() for name, value in phi.items()}
        runs, weights = _stacked_runs(learner, tasks)
        steps, stacked = config.inner.steps, list(weights.values())
        for step in range(steps):  # plain SGD steps on every task at once, without a graph
            grads = torch.autograd.grad(stacked_inner_loss(problem, weights, frozen, runs, step), stacked)
            with torch.no_grad():
                for w, g in zip(stacked, grads):
                    w.sub_(config.inner.lr * g)
        inner = stacked_inner_loss(problem, weights, phi, runs, max(steps - 1, 0))
        inner_grads = torch.autograd.grad(inner, stacked, create_graph=True)
        # the Hessian of the summed loss is block diagonal over tasks: H v on stacked v is every task's own H_i v_i
        hypergradient = implicit_hypergradient(inner_grads, stacked, list(phi.values()),
                                               _validation_loss(problem, weights), _dot_per_task)
        return torch.cat([g.reshape(-1) for g in hypergradient])

    return run


hand_batched_decay = _hand_batched_implicit(_decayed_loss)
hand_batched_hyperclean = _hand_batched_implicit(_reweighted_loss)


def _betty(kind: str, **method):
    def run(config, learner, tasks) -> torch.Tensor:
        from benchmarks import peers_betty

        problem, total = learner.problem, 0.0
        for task, params, names in _runs(learner, tasks):
            total = total + peers_betty.hypergradient(problem, learner.theta, task, dict(zip(names, params)),
                                                      config.inner.steps, kind, lr=config.inner.lr, **method)
        return total

    return run


betty_unrolled = _betty("unrolled")
betty_neumann = _betty("implicit", type="neumann", neumann_iterations=SOLVES["neumann"].solve.terms,
                       neumann_alpha=NEUMANN_ALPHA)
betty_cg = _betty("implicit", type="cg", cg_iterations=SOLVES["cg-undamped"].solve.cg_steps, cg_alpha=1.0)

PEERS = {"learning_rate": {"distmaml-loop": distmaml_loop, "torchopt": torchopt_lr, "higher": higher_lr, "betty": betty_unrolled,
                           PLAIN_LOOP: plain_lr, HAND_BATCHED: hand_batched_lr},
         "weight_decay": {"distmaml-loop": distmaml_loop, "torchopt": torchopt_implicit, "distmaml-neumann": distmaml_neumann, "betty": betty_neumann,
                          "betty-cg": betty_cg, PLAIN_LOOP: plain_implicit, HAND_BATCHED: hand_batched_decay},
         "distill": {"distmaml-loop": distmaml_loop, "torchopt": torchopt_distill, "higher": higher_distill, "betty": betty_unrolled,
                     PLAIN_LOOP: plain_distill, HAND_BATCHED: hand_batched_distill},
         "hyperclean": {"distmaml-loop": distmaml_loop, "torchopt": torchopt_implicit, "distmaml-neumann": distmaml_neumann, "betty": betty_neumann,
                        "betty-cg": betty_cg, PLAIN_LOOP: plain_implicit, HAND_BATCHED: hand_batched_hyperclean}}
PEER_PACKAGES = ("torchopt", "higher", "betty")


def not_installed(err: ImportError) -> str:
    """A missing peer's status; any other failed import (a broken one, or ours) is raised as the error it is."""
    if err.name not in PEER_PACKAGES:
        raise err
    return f"not installed ({err})"

# What each library's hypergradient is checked against and timed beside: distmaml with the same solve.
SOLVE_OF = {"distmaml-neumann": "neumann", "betty": "neumann", "betty-cg": "cg-undamped"}
HOW = {"distmaml": "distmaml.meta.meta_gradient, tasks batched",
       "distmaml-loop": "distmaml's per-task loop, meta_gradient_loop (engine.batched=false)",
       "torchopt": "per initialisation",
       "higher": "per initialisation", "distmaml-neumann": "the same, Neumann series",
       "betty": "an Engine per initialisation", "betty-cg": "an Engine per initialisation, its cg",
       PLAIN_LOOP: "plain torch.autograd.grad, per initialisation (written for the benchmark, no library)",
       HAND_BATCHED: "stacked weights [tasks, ...], one baddbmm per linear layer, autograd of the summed loss "
                     "(written for the benchmark, no library)"}


def compare_and_time(case: str, windows: int, seconds: float, steps: int | None = None, tasks: int = TASKS,
                     more: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    config, learner, batch = setup(case, "float64", steps, tasks=tasks, more=more)
    implicit = isinstance(learner.inner.method, Implicit)
    references = {}
    config32, learner32, batch32 = setup(case, "float32", steps, tasks=tasks, more=more)
    rows = []
    for name, fn in {"distmaml": distmaml_grad, **PEERS[case]}.items():
        solve = SOLVE_OF.get(name, "cg") if implicit else "cg"
        if solve not in references:
            references[solve] = distmaml_grad(config, learner, batch, solve)
        row = {"case": case, "library": name, "how": HOW[name], "tasks": tasks, "inner_steps": config.inner.steps}
        if implicit:
            row["solve"] = solve
        try:
            got = fn(config, learner, batch)
        except ImportError as err:
            rows.append({**row, "status": not_installed(err)})
            continue
        except PeerFailed as err:
            rows.append({**row, "status": "fails", "error": str(err)})
            print(f"{case:>14} {name:>16}: {err}", flush=True)
            continue
        error = float((got.reshape(-1) - references[solve]).norm() / references[solve].norm())
        row.update(relative_error=error, status="equal" if error <= TOLERANCE else "DIFFERS")
        if error <= TOLERANCE:
            row["ms_per_hypergradient"] = 1e3 * median_seconds(lambda: fn(config32, learner32, batch32), windows,
                                                               seconds)
        rows.append(row)
        print(f"{case:>14} {name:>16}: relative difference {error:.1e}, "
              f"{row.get('ms_per_hypergradient', float('nan')):9.1f} ms", flush=True)
    for mine in (r for r in rows if r["library"].startswith("distmaml") and "ms_per_hypergradient" in r):
        mine.update(speedups(rows, mine))
    batched, loop = (next((r for r in rows if r["library"] == name and "ms_per_hypergradient" in r), None)
                     for name in ("distmaml", "distmaml-loop"))
    if batched and loop and "speedup_over_fastest_loop" in batched:
        # The faster of distmaml's two paths, what engine.batched=auto runs, against the fastest loop.
        fastest = batched["speedup_over_fastest_loop"] * batched["ms_per_hypergradient"]
        batched["auto_speedup_over_fastest_loop"] = fastest / min(batched["ms_per_hypergradient"],
                                                                  loop["ms_per_hypergradient"])
    return rows


def speedups(rows: list[dict[str, Any]], mine: dict[str, Any]) -> dict[str, float]:
    """A distmaml row's time against the rows timed with the same solve: the fastest library (the rows
    written for the benchmark are not libraries), the fastest per-initialisation loop (a library's or the
    plain loop), and the hand-batched implementation."""
    timed = {r["library"]: r["ms_per_hypergradient"] for r in rows if not r["library"].startswith("distmaml")
             and r.get("solve") == mine.get("solve") and "ms_per_hypergradient" in r}
    libraries = [ms for name, ms in timed.items() if name not in WRITTEN_HERE]
    loops = [ms for name, ms in timed.items() if name != HAND_BATCHED]
    out, ms = {}, mine["ms_per_hypergradient"]
    if libraries:
        out["speedup_over_fastest_peer"] = min(libraries) / ms
    if loops:
        out["speedup_over_fastest_loop"] = min(loops) / ms
    if HAND_BATCHED in timed:
        out["speed_vs_hand_batched"] = timed[HAND_BATCHED] / ms
    return out


MEMORY_CASE = r"""
import json, resource, sys, torch
torch.set_num_threads(1)
from benchmarks.peers_betty import PeerFailed
from benchmarks.peers_hyper import PEERS, distmaml_grad, not_installed, setup
case, library, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
checkpoint = "auto" if library == "distmaml" else "none"
config, learner, tasks = setup(case, "float32", steps, checkpoint)
def status(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
before = status("VmRSS")
fn = {"distmaml": distmaml_grad, "distmaml-stored": distmaml_grad, **PEERS[case]}[library]
try:
    fn(config, learner, tasks)
except PeerFailed as err:  # reported by the timing rows
    print(json.dumps({"failed": str(err)}))
    sys.exit(0)
except ImportError as err:
    print(json.dumps({"failed": not_installed(err)}))
    sys.exit(0)
print(json.dumps({"peak_mib": (status("VmHWM") - before) / 2 ** 20}))
"""


def _peak_mib(case: str, library: str, steps: int) -> float:
    out = fresh_process(MEMORY_CASE, case, library, str(steps), what=f"memory case {library}")
    if "failed" in out:
        raise PeerFailed(out["failed"])
    return out["peak_mib"]


# How a memory row's library holds the unroll, where it is not simply stored.
MEMORY_HOW = {"distmaml": "recomputed, sqrt(T) segments",
              PLAIN_LOOP: "stored unroll, one initialisation's at a time (a backward each)"}


def memory(case: str, steps: int) -> list[dict[str, Any]]:
    """Each library's peak at T steps and at one step, both in fresh processes. What the first call
    itself brings in (mostly the code pages of the kernels it runs for the first time, which count
    as resident memory) is the same at any T, so the difference is what the unroll itself holds."""
    rows = []
    # distmaml's per-task loop is timed above; its memory is the plain loop's kind (one task's graph at a time).
    for library in ("distmaml", "distmaml-stored", *(name for name in PEERS[case] if name != "distmaml-loop")):
        started = time.perf_counter()
        try:
            peak = _peak_mib(case, library, steps)
        except PeerFailed as err:
            print(f"memory {case} T={steps} {library:>16}: {err}", flush=True)
            continue
        seconds = time.perf_counter() - started
        one_step = _peak_mib(case, library, 1)
        row = {"case": case, "library": library, "inner_steps": steps, "tasks": TASKS,
               "how": MEMORY_HOW.get(library, "stored unroll"),
               "peak_mib": peak, "peak_mib_one_step": one_step, "unroll_mib": peak - one_step, "seconds": seconds}
        rows.append(row)
        print(f"memory {case} T={steps} {library:>16}: {peak:8.1f} MiB above baseline, {one_step:.1f} at T = 1",
              flush=True)
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="+", choices=[*CASES, "memory"])
    parser.add_argument("--quick", action="store_true", help="shorter windows, a shorter memory unroll")
    parser.add_argument("--windows", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--memory-steps", type=int, default=1000, help="T of the learning-rate memory rows "
                        "(the distillation rows: T = 300)")
    parser.add_argument("--out", default=None, help="JSON file (default benchmarks/results/peers_hyper_cpu.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.quick:
        args.windows, args.seconds, args.memory_steps = 1, 0.1, 100
    started, rows = time.time(), []
    for case in CASES:
        if not args.only or case in args.only:
            rows += compare_and_time(case, args.windows, args.seconds)
    if not args.only or "memory" in args.only:
        rows += memory("learning_rate", args.memory_steps)
        rows += memory("distill", 300 if not args.quick else 30)
    result = {"benchmark": "peers_hyper", "command": " ".join(["python -m benchmarks.peers_hyper",
                                                               *(argv or sys.argv[1:])]),
              "machine": machine(torch.device("cpu")), "tolerance": TOLERANCE, "windows": args.windows,
              "seconds": args.seconds, "wall_seconds": time.time() - started, "rows": rows}
    print(f"wrote {write(result, args.out or RESULTS / 'peers_hyper_cpu.json')}")
    return result


if __name__ == "__main__":
    main()
