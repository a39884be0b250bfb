"""What the outer loop keeps between log steps to tell a run that is going wrong from one that is not.

    watch = RunWatch(config, step, resumed, device)
    watch.record(out)                        # every iteration: its meta-loss and meta-gradient norm
    loss, iterations, seconds = watch.window()   # at a log step: the window's mean meta-loss, its length
    watch.close_window(iteration, ...)       # then: the next window's bounds, and the warnings due
    state.update(watch.checkpoint_fields())  # what a checkpoint keeps of it, so a resume goes on alike

- The logging window's summed meta-loss and its meta-gradient norms, on the device (no host sync
  per iteration).
- The meta-loss bound (train.max_meta_loss_factor times the first window's median meta-loss) and
  the meta-gradient norm bound (train.max_grad_norm_factor times the previous window's median
  norm; within the first window, the median of the norms so far once there are FIRST_NORMS), both
  written into the step's device tensors, where every iteration compares against them.
- Tensors of phi whose meta-gradient stayed exactly 0 for a whole window, and an inner loss too
  sharp for the rule's steps: each warned once.
- Online: the runs left out of the window's steps for a state that was not finite (and started again),
  and whether they were more than online.max_resets of its run-steps.
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import torch

from distmaml.engine.preflight import unreached_warning  # the diagnosis the first iteration's refusal gives
from distmaml.meta.reachability import unreached

log = logging.getLogger("distmaml.train")

# Within the first logging window, the meta-gradient's norm is bounded by the median of the norms so
# far once there are this many: one iteration's norm alone is no reference.
FIRST_NORMS = 3


class RunWatch:
    def __init__(self, config, step, resumed, device: torch.device):
        self.config, self.step = config, step
        train = config.train
        self.loss_factor, self.norm_factor = train.max_meta_loss_factor, train.max_grad_norm_factor
        start = resumed.iteration
        # The first window's median meta-loss, once known, and until then its meta-losses (a blow-up
        # inside the window would dominate a mean); a resumed run goes on with the window it began.
        self.reference = resumed.reference
        self.first_window = [] if resumed.first_window is None else list(resumed.first_window.to(device).unbind())
        self.first_window_start = start - len(self.first_window)
        self._bound_loss()
        # The meta-gradient's norms of the current window; their median bounds the next window's.
        self.norms = [] if resumed.window_grad_norms is None else list(resumed.window_grad_norms.to(device).unbind())
        step.grad_bound.fill_(resumed.grad_norm_bound)
        self.first_norm_window = not math.isfinite(resumed.grad_norm_bound)
        self.window_loss = torch.zeros((), dtype=torch.float64, device=device)
        self.window_resets = torch.zeros((), dtype=torch.float64, device=device)
        self.window_start, self.window_time = start, time.perf_counter()
        self.warned_unreached: set[str] = set()
        self.warned_sharp = False

    def record(self, out) -> None:
        """One iteration's meta-loss and meta-gradient norm (device tensors, copied: a CUDA graph reuses its
        outputs)."""
        self.window_loss += out.meta_loss
        self.window_resets += out.excluded
        self.norms.append(out.grad_norm.detach().clone())
        if self.first_norm_window and len(self.norms) >= FIRST_NORMS:
            self._bound_norm()
        if self.reference is None:
            self.first_window.append(out.meta_loss.detach().clone())

    def window(self, iteration: int) -> tuple[float, int, float]:
        """(the window's mean meta-loss over every rank, its iterations, its seconds) at a log step."""
        iterations = iteration - self.window_start
        mean_loss = (self.window_loss / max(iterations, 1)).item()
        return mean_loss, iterations, time.perf_counter() - self.window_time

    def resets(self, iteration: int) -> tuple[float, str | None]:
        """(the runs started again in the window for a non-finite state, why that is divergence: past
        online.max_resets of the window's run-steps; else None) at a log step. Episodic runs have none."""
        online, count = self.config.online, float(self.window_resets)
        run_steps = online.runs * (iteration - self.window_start)
        if not count or count <= online.max_resets * run_steps:
            return count, None
        return count, (f"{count:.0f} of the {run_steps} run-steps of the last {iteration - self.window_start} "
                       f"iteration(s) had a state that was not finite and started again, above online.max_resets "
                       f"= {online.max_resets:g} of them")

    def close_window(self, iteration: int, params, sharpness_warning) -> None:
        """At a log step, after the window was read: sets the bounds the next window is held to and gives
        the warnings due. `sharpness_warning()` is the trainer's check of the inner loss's curvature,
        asked until it has warned once."""
        if self.reference is None:
            median = torch.stack(self.first_window).median().item()
            self.reference = {"meta_loss": median, "first": self.first_window_start + 1, "last": iteration}
            self._bound_loss()
            self.first_window.clear()
        self._bound_norm()
        self.norms.clear()
        self.first_norm_window = False
        never = [name for name in unreached(params, self.step.reached, self.config.train.allow_unreached)
                 if name not in self.warned_unreached]
        if never:
            log.warning("%s", unreached_warning(self.config, never, self.window_start + 1, iteration))
            self.warned_unreached.update(never)
        self.step.reached.zero_()
        if not self.warned_sharp:
            sharp = sharpness_warning()
            if sharp:
                log.warning("%s", sharp)
                self.warned_sharp = True
        self.window_loss.zero_()
        self.window_resets.zero_()
        self.window_start, self.window_time = iteration, time.perf_counter()

    def checkpoint_fields(self) -> dict[str, Any]:
        """What a checkpoint keeps, so that a resumed run is held to the same bounds (distmaml.run.resume)."""
        fields: dict[str, Any] = {"meta_loss_reference": self.reference,
                                  "grad_norm_bound": float(self.step.grad_bound)}
        if self.reference is None and self.first_window:
            fields["first_window_losses"] = torch.stack(self.first_window).cpu()
        if self.norms:
            fields["window_grad_norms"] = torch.stack(self.norms).cpu()
        return fields

    def _bound_loss(self) -> None:
        # On the device, where the step compares every iteration's meta-loss with it (no host sync).
        value = abs(self.reference["meta_loss"]) if self.reference else 0.0
        if self.loss_factor and math.isfinite(value) and value > 0:
            self.step.loss_bound.fill_(self.loss_factor * value)

    def _bound_norm(self) -> None:
        # On the device, without a host sync: kept where the median is not a usable reference.
        if not (self.norm_factor and self.norms):
            return
        median = torch.stack(self.norms).median().to(self.step.grad_bound.dtype)
        usable = torch.isfinite(median) & (median > 0)
        self.step.grad_bound.copy_(torch.where(usable, self.norm_factor * median, self.step.grad_bound))
