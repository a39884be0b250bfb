"""One meta-iteration of training as a callable, run eagerly or replayed as one CUDA graph.

At the sine scale a meta-iteration is thousands of tiny kernels, and launching them from Python
costs far more than running them. With engine.cuda_graph the whole iteration -- on-device task
sampling keyed by a device-tensor iteration counter, the batched inner loops, the meta-backward,
the gradient all-reduce (NCCL is capturable), clipping and a capturable Adam step -- is captured
once and replayed, so each iteration costs one launch. Eager and graph modes run the same body.
"""

from __future__ import annotations

import contextlib
import math
from typing import NamedTuple

import torch

from distmaml import dist
from distmaml.meta import (MetaGradient, implicit_meta_gradient, implicit_meta_gradient_loop, meta_gradient,
                           meta_gradient_loop)
from distmaml.tasks import TaskBatch
from distmaml.tasks.rng import STREAM_TRAIN

# Weights' dtype, and the autocast dtype of the model's matmuls/convolutions (None: no autocast).
DTYPES = {"float32": (torch.float32, None), "float64": (torch.float64, None), "bf16": (torch.float32, torch.bfloat16)}

# Eager iterations before capture: they run the lazy initialisations (Adam state, cuBLAS handles,
# NCCL communicators) that must not happen while a graph is being captured.
WARMUP_ITERATIONS = 3


class StepOutput(NamedTuple):
    batch: TaskBatch
    result: MetaGradient
    grad_norm: torch.Tensor
    stop_votes: torch.Tensor  # per stop reason, how many ranks asked to stop after this iteration


def make_optimizer(params, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam on the meta-parameters. On CUDA it is the capturable variant (step count and learning
    rate live on the device) in eager and graph mode alike, so both compute the same numbers."""
    if device.type == "cuda":
        return torch.optim.Adam(params, lr=torch.tensor(lr, device=device), capturable=True)
    return torch.optim.Adam(params, lr=lr)


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


def compute_meta_gradient(model, params, batch: TaskBatch, config, family) -> MetaGradient:
    """This rank's summed meta-gradient in the configured mode, batched or with the per-task loop."""
    inner = config.inner
    if batch.num_tasks == 0:  # more processes than tasks: this rank only joins the all-reduce
        return MetaGradient({name: torch.zeros_like(p) for name, p in params.items()},
                            batch.support_x.new_zeros(0), {})
    if inner.mode == "implicit":
        solver = dict(lam=config.implicit.lam, cg_steps=config.implicit.cg_steps,
                      cg_damping=config.implicit.cg_damping, cg_tol=config.implicit.cg_tol,
                      inner_safeguard=config.implicit.inner_safeguard)
        if not config.engine.batched:
            return implicit_meta_gradient_loop(model, params, batch, inner.lr, inner.steps, loss_fn=family.loss,
                                               **solver)
        # Stopping CG early needs the host to look at the residual each step; a graph cannot.
        return implicit_meta_gradient(model, params, batch, inner.lr, inner.steps, loss_fn=family.loss,
                                      stop_early=not config.engine.cuda_graph, **solver)
    if config.engine.batched:
        return meta_gradient(model, params, batch, inner.lr, inner.steps, inner.mode, inner.truncate, family.loss,
                             checkpoint=inner.checkpoint, checkpoint_segment=inner.checkpoint_segment)
    grads, losses = meta_gradient_loop(model, params, batch, inner.lr, inner.steps, inner.mode, inner.truncate,
                                       family.loss)
    return MetaGradient(grads, losses, {})


class MetaStep:
    """sample -> meta-gradient -> all-reduce -> clip -> Adam, for one iteration at a time.

    `static=True` routes every input through fixed device tensors (the iteration counter, the stop
    flag) as graph replay needs; with `cuda_graph=True` (which implies static) the body is captured
    after WARMUP_ITERATIONS eager iterations and replayed from then on.
    """

    def __init__(self, model, params, optimizer, family, config, ctx: dist.Context, static: bool = False,
                 stop_reasons: int = 1):
        self.model, self.params, self.optimizer, self.family = model, params, optimizer, family
        self.config, self.ctx = config, ctx
        self.cuda_graph = config.engine.cuda_graph
        self.static = static or self.cuda_graph
        self.tasks = dist.shard(config.train.meta_batch, ctx.rank, ctx.world_size)  # this rank's global indices
        self.indices = torch.arange(self.tasks.start, self.tasks.stop, device=ctx.device)
        weight_dtype, self.autocast_dtype = DTYPES[config.engine.dtype]
        self.iteration = torch.zeros((), dtype=torch.int64, device=ctx.device)
        self.stop_flag = torch.zeros(stop_reasons, dtype=weight_dtype, device=ctx.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.captured: StepOutput | None = None
        self.eager_iterations = 0

    def __call__(self, iteration: int, stop_requests: tuple[bool, ...] = ()) -> StepOutput:
        """Run iteration `iteration`; stop_requests: which of the stop reasons this rank has seen."""
        for slot, requested in enumerate(stop_requests):
            self.stop_flag[slot].fill_(float(requested))
        if not self.static:
            return self._body(iteration, self.stop_flag)
        self.iteration.fill_(iteration)
        if not self.cuda_graph:
            return self._body(self.iteration, self.stop_flag)
        if self.graph is None and self.eager_iterations < WARMUP_ITERATIONS:
            self.eager_iterations += 1
            return self._on_side_stream(lambda: self._body(self.iteration, self.stop_flag))
        if self.graph is None:
            self._capture()
        self.graph.replay()
        return self.captured

    def _body(self, iteration: int | torch.Tensor, stop_flag: torch.Tensor) -> StepOutput:
        train = self.config.train
        batch = self.family.sample(STREAM_TRAIN, iteration, self.indices)
        # No autocast weight cache: a captured graph must recompute the casts on every replay.
        autocast = (torch.autocast(self.ctx.device.type, dtype=self.autocast_dtype, cache_enabled=False)
                    if self.autocast_dtype else contextlib.nullcontext())
        with autocast:
            result = compute_meta_gradient(self.model, self.params, batch, self.config, self.family)
        # Stop requests ride along in the gradient's all-reduce, so every rank stops after the same
        # iteration even when a signal reached only some of them or their clocks disagree.
        *grads, stop_votes = dist.all_reduce_sum([*result.grad_sum.values(), stop_flag], self.ctx)
        for param, grad in zip(self.params.values(), grads):
            param.grad = grad.to(param.dtype) / train.meta_batch
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params.values(), train.grad_clip or math.inf)
        self.optimizer.step()
        return StepOutput(batch, result, grad_norm, stop_votes)

    def _on_side_stream(self, fn):
        # Warm-up before capture runs on a side stream, as CUDA graph capture requires.
        stream = torch.cuda.Stream(device=self.ctx.device)
        stream.wait_stream(torch.cuda.current_stream(self.ctx.device))
        with torch.cuda.stream(stream):
            out = fn()
        torch.cuda.current_stream(self.ctx.device).wait_stream(stream)
        return out

    def _capture(self) -> None:
        torch.cuda.synchronize(self.ctx.device)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.captured = self._body(self.iteration, self.stop_flag)
