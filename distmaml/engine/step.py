"""One meta-iteration of training as a callable, run eagerly or replayed as one CUDA graph.

At the sine scale a meta-iteration is thousands of tiny kernels, and launching them from Python
costs far more than running them. With engine.cuda_graph the whole iteration -- on-device task
sampling keyed by a device-tensor iteration counter, the batched inner loops, the meta-backward,
the gradient all-reduce (NCCL is capturable), clipping and a capturable Adam step -- is captured
once and replayed, so each iteration costs one launch. Eager and graph modes run the same body.
What changes between iterations lives in device tensors the graph reads: the iteration counter,
the stop flags, the learning rate and MAML++'s per-step loss weights.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from typing import Any, NamedTuple

import torch

from distmaml.build import DTYPES, Learner
from distmaml.engine import dist
from distmaml.engine.schedule import make_schedule, shard
from distmaml.meta import FirstOrder, Inner, MetaGradient, Tasks, meta_gradient, meta_gradient_loop, num_tasks
from distmaml.meta.functional import Noise
from distmaml.meta.reachability import reached_flags, unreached, zero_at_start

# Eager iterations before capture: they run the lazy initialisations (Adam state, cuBLAS handles,
# NCCL communicators) that must not happen while a graph is being captured.
WARMUP_ITERATIONS = 3
MULTI_STEP_FLOOR = 0.03  # MAML++: the earlier steps' loss weights never fall below 0.03 / K


class Unreached(Exception):
    """The first meta-batch's hypergradient is exactly zero in every element of these tensors of phi."""

    def __init__(self, names: list[str], cause: str | None = None):
        super().__init__(", ".join(names))
        self.names, self.cause = names, cause  # cause: what the method itself can tell of the zero


class StepOutput(NamedTuple):
    batch: Tasks
    result: MetaGradient
    grad_norm: torch.Tensor
    stop_votes: torch.Tensor  # per stop reason, how many ranks asked to stop after this iteration
    meta_loss: torch.Tensor  # mean query loss after adaptation over the whole meta-batch (all ranks)
    problem: Any  # the problem the batch's tasks belong to (online: the runs' view of the learner's)
    excluded: torch.Tensor  # online: runs left out of this step (all ranks) for a state that is not finite


def make_optimizer(params, lr: float, device: torch.device, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam on the meta-parameters. On CUDA it is the capturable variant (step count and learning
    rate live on the device) in eager and graph mode alike, so both compute the same numbers."""
    params = list(params)
    if not params:
        return NoMetaParameters()
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=torch.tensor(lr, device=device), betas=betas, capturable=True)
    return torch.optim.Adam(params, lr=lr, betas=betas)


class NoMetaParameters:
    """The outer optimizer of a problem with nothing to learn (Learning to Reweight, whose persistent
    runs are the result): its step changes nothing, and its state is empty."""

    param_groups: list = []
    state: dict = {}

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        pass

    def state_dict(self) -> dict:
        return {"state": {}, "param_groups": []}

    def load_state_dict(self, state: dict) -> None:
        pass


def fit_optimizer_to(optimizer: torch.optim.Adam, device: torch.device) -> None:
    """Make a restored Adam state fit this run's device: a state dict brings the saving run's
    `capturable` setting and step counters, which a checkpoint from a GPU resumed on a CPU (or the
    reverse, under a CUDA graph) cannot use."""
    capturable = device.type == "cuda"
    for group in optimizer.param_groups:
        group["capturable"] = capturable
        for param in group["params"]:
            state = optimizer.state.get(param, {})
            if "step" in state:
                step = float(state["step"])
                state["step"] = (torch.tensor(step, dtype=torch.float32, device=param.device) if capturable
                                 else torch.tensor(step))


def learning_rate(config, iteration: int, iterations: int | None = None) -> float:
    """The outer learning rate at `iteration`: constant, or cosine from train.lr to train.lr_min over
    `iterations` (default train.iterations)."""
    train = config.train
    iterations = train.iterations if iterations is None else iterations
    if train.lr_schedule == "constant" or iterations == 0:
        return train.lr
    return train.lr_min + (train.lr - train.lr_min) * 0.5 * (1 + math.cos(math.pi * iteration / iterations))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        if not group.get("capturable"):
            group["lr"] = lr
            continue
        device = group["params"][0].device
        if not (torch.is_tensor(group["lr"]) and group["lr"].device == device):
            # A restored state dict brings its learning rate as a float or a CPU tensor.
            group["lr"] = torch.tensor(lr, device=device)
        group["lr"].fill_(lr)  # in place: a captured graph keeps reading the same tensor


def multi_step_weights(steps: int, iteration: int, anneal: int) -> list[float]:
    """MAML++'s multi-step loss weights of the query losses after inner steps 1..K at `iteration`.

    All 1/K at first; the earlier steps' weights fall linearly to their floor 0.03/K over `anneal`
    iterations while the last step's rises, so the weights always sum to 1 and the objective ends
    (almost) at MAML's, the loss after the last step (Antoniou et al. 2019, section 4). anneal = 0
    keeps them all 1/K: the objective stays the mean of the query losses after steps 1..K.
    """
    if steps <= 1:
        return [1.0] * steps
    progress = min(iteration / anneal, 1.0) if anneal else 0.0
    earlier = max((1 - progress) / steps, MULTI_STEP_FLOOR / steps)
    return [earlier] * (steps - 1) + [1 - earlier * (steps - 1)]


def compute_meta_gradient(problem, theta, tasks: Tasks, inner: Inner, batched: bool = True,
                          step_weights: torch.Tensor | None = None, noise: Noise | None = None) -> MetaGradient:
    """This rank's summed hypergradient, batched or with the per-task reference loop; `noise`: where a
    stochastic method draws its perturbations."""
    if batched or num_tasks(tasks) == 0:  # no tasks: this rank only joins the all-reduce
        return meta_gradient(problem, theta, tasks, inner, step_weights, noise)
    return meta_gradient_loop(problem, theta, tasks, inner, step_weights, noise)


class MetaStep:
    """sample -> meta-gradient -> all-reduce -> clip -> Adam, for one iteration at a time.

    `static=True` routes every input through fixed device tensors (the iteration counter, the stop
    flag, the multi-step weights) as graph replay needs; with `cuda_graph=True` (which implies
    static) the body is captured after WARMUP_ITERATIONS eager iterations and replayed from then on,
    and captured again when derivative-order annealing switches the mode.
    """

    def __init__(self, learner: Learner, optimizer, config, ctx: dist.Context, static: bool = False,
                 stop_reasons: int = 1, batched: bool | None = None):
        self.problem, self.params, self.family = learner.problem, learner.theta, learner.family
        self.model = learner.model
        self.inner, self.optimizer, self.config, self.ctx = learner.inner, optimizer, config, ctx
        # MAML++'s derivative-order annealing: first order before inner.first_order_iterations.
        self.first_order_inner = dataclasses.replace(self.inner, method=FirstOrder())
        self.cuda_graph = config.engine.cuda_graph
        # The path engine.batched names, or for `auto` the one the trainer chose (preflight.choose_path);
        # a MetaStep built without a choice (a benchmark, a test) takes the batched path for `auto`.
        self.batched = batched if batched is not None else config.engine.batched is not False
        self.static = static or self.cuda_graph
        self.tasks = shard(config, ctx, self.inner.method)  # this rank's global indices
        self.indices = torch.arange(self.tasks.start, self.tasks.stop, device=ctx.device)
        # Tasks drawn afresh each outer step, or persistent runs (online.runs): this rank's share either way.
        self.schedule = make_schedule(learner, config, self.indices)
        weight_dtype, self.autocast_dtype = DTYPES[config.engine.dtype]
        self.iteration = torch.zeros((), dtype=torch.int64, device=ctx.device)
        self.stop_flag = torch.zeros(stop_reasons, dtype=weight_dtype, device=ctx.device)
        self.step_weights = (torch.zeros(self.inner.steps, dtype=weight_dtype, device=ctx.device)
                             if config.inner.multi_step_loss else None)
        # The first iteration whose meta-loss or meta-gradient was not finite (or above
        # train.max_meta_loss or loss_bound), -1 while none was, and its meta-loss: set on the
        # device, read by the host when it likes.
        self.diverged_at = torch.full((), -1, dtype=torch.int64, device=ctx.device)
        self.diverged_loss = torch.full((), math.nan, dtype=weight_dtype, device=ctx.device)
        # train.max_meta_loss_factor times the first logged window's meta-loss, once the trainer knows it.
        self.loss_bound = torch.full((), math.inf, dtype=weight_dtype, device=ctx.device)
        # train.max_grad_norm_factor times the previous logged window's median meta-gradient norm (within
        # the first window, the median of its norms so far: distmaml.run.watch), and the norm at the diverged
        # iteration.
        self.grad_bound = torch.full((), math.inf, dtype=weight_dtype, device=ctx.device)
        self.diverged_norm = torch.full((), math.nan, dtype=weight_dtype, device=ctx.device)
        # Per tensor of phi, whether its meta-gradient was non-zero anywhere in this logging window.
        self.reached = torch.zeros(len(self.params), dtype=torch.bool, device=ctx.device)
        # Set by the trainer for a fresh run: check the first meta-batch's hypergradient reaches phi.
        self.check_reachable = False
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured: StepOutput | None = None
        self.captured_inner: Inner | None = None
        self.eager_iterations = 0

    def show_inner_progress(self, callback) -> None:
        """Report the inner steps of each unroll to `callback` (a progress bar); None leaves it as it is."""
        if callback is not None:
            self.inner = dataclasses.replace(self.inner, progress=callback)
            self.first_order_inner = dataclasses.replace(self.first_order_inner, progress=callback)

    def inner_at(self, iteration: int) -> Inner:
        """The inner loop of `iteration`: first order during inner.first_order_iterations (MAML++)."""
        return self.first_order_inner if iteration < self.config.inner.first_order_iterations else self.inner

    def __call__(self, iteration: int, stop_requests: tuple[bool, ...] = ()) -> StepOutput:
        """Run iteration `iteration`; stop_requests: which of the stop reasons this rank has seen."""
        for slot, requested in enumerate(stop_requests):
            self.stop_flag[slot].fill_(float(requested))
        if self.step_weights is not None:
            weights = multi_step_weights(self.inner.steps, iteration, self.config.inner.multi_step_anneal)
            self.step_weights.copy_(torch.tensor(weights, dtype=self.step_weights.dtype))
        inner = self.inner_at(iteration)
        if not self.static:
            return self._body(iteration, inner)
        self.iteration.fill_(iteration)
        if not self.cuda_graph:
            return self._body(self.iteration, inner)
        if self.graph is not None and inner is not self.captured_inner:
            self.graph, self.eager_iterations = None, 0  # the unroll changed: warm up and capture it anew
        if self.graph is None and self.eager_iterations < WARMUP_ITERATIONS:
            self.eager_iterations += 1
            return self._on_side_stream(lambda: self._body(self.iteration, inner))
        if self.graph is None:
            self._capture(inner)
        self.graph.replay()
        return self.captured

    def _body(self, iteration: int | torch.Tensor, inner: Inner) -> StepOutput:
        train = self.config.train

        def compute(problem, tasks, inner, noise):
            with self._autocast():
                return compute_meta_gradient(problem, self.params, tasks, inner, self.batched, self.step_weights, noise)

        problem, batch, result = self.schedule.lookahead(iteration, inner, compute)
        # Stop requests, the loss and the count of tasks (online: runs left out for a state that is not
        # finite are not counted) ride along in the gradient's all-reduce, so every rank stops after the
        # same iteration even when a signal reached only some of them or their clocks disagree, and
        # every rank sees the same meta-loss.
        loss_sum = result.task_losses.sum().reshape(1).to(self.stop_flag.dtype)
        excluded = self.schedule.excluded(self.ctx.device).reshape(1).to(self.stop_flag.dtype)
        *grads, stop_votes, loss_sum, excluded = dist.all_reduce_sum(
            [*result.grad_sum.values(), self.stop_flag, loss_sum, excluded], self.ctx)
        counted = (train.meta_batch - excluded[0]).clamp(min=1)
        skipped = self.schedule.nothing_counted(excluded[0])  # every run left out: no outer step at all
        for param, grad in zip(self.params.values(), grads):
            param.grad = None if skipped else grad.to(param.dtype) / counted
        reached = reached_flags(grads, self.ctx.device)
        # Once, eagerly, before the first outer step changes anything; online, on the first step that
        # left no run out (a run left out for a non-finite state adds nothing, and would look unreached).
        if self.check_reachable and not bool(excluded[0] > 0):
            self.check_reachable = False
            allowed = [*self.config.train.allow_unreached, *zero_at_start(self.model)]
            names = unreached(self.params, reached, allowed)
            if names:
                cause = getattr(inner.method, "zero_cause", lambda stats: None)(result.stats)
                raise Unreached(names, cause)
        self.reached |= reached
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params.values(), train.grad_clip or math.inf)
        meta_loss = loss_sum[0] / counted
        # The all-reduced values are the same on every rank, so every rank flags the same iteration.
        diverged = (~torch.isfinite(meta_loss) | ~torch.isfinite(grad_norm) | (meta_loss > self.loss_bound)
                    | (grad_norm > self.grad_bound))
        if train.max_meta_loss:
            diverged = diverged | (meta_loss > train.max_meta_loss)
        first = diverged & (self.diverged_at < 0)
        self.diverged_at.copy_(torch.where(first, torch.as_tensor(iteration, device=self.diverged_at.device),
                                           self.diverged_at))
        self.diverged_loss.copy_(torch.where(first, meta_loss.to(self.diverged_loss.dtype), self.diverged_loss))
        self.diverged_norm.copy_(torch.where(first, grad_norm.to(self.diverged_norm.dtype), self.diverged_norm))
        self.optimizer.step()
        with self._autocast():  # online runs' real steps in the lookahead's precision
            self.schedule.advance(self.params)
        return StepOutput(batch, result, grad_norm, stop_votes, meta_loss, problem, excluded[0])

    def _autocast(self):
        # No autocast weight cache: a captured graph must recompute the casts on every replay.
        return (torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype, cache_enabled=False)
                if self.autocast_dtype else contextlib.nullcontext())

    def _on_side_stream(self, fn):
        # Warm-up before capture runs on a side stream, as CUDA graph capture requires.
        stream = torch.cuda.Stream(device=self.ctx.device)
        stream.wait_stream(torch.cuda.current_stream(self.ctx.device))
        with torch.cuda.stream(stream):
            out = fn()
        torch.cuda.current_stream(self.ctx.device).wait_stream(stream)
        return out

    def _capture(self, inner: Inner) -> None:
        torch.cuda.synchronize(self.ctx.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.captured = self._body(self.iteration, inner)
        self.captured_inner = inner
