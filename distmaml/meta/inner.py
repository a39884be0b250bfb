"""How every task's inner problem is run and differentiated: the rule, the unroll, the method."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from distmaml.meta.checkpointing import CHECKPOINTS
from distmaml.meta.methods import Method, MethodError, SecondOrder, make_method
from distmaml.meta.rules import SGD, Rule


@dataclass(frozen=True)
class Inner:
    """The inner loop of a bi-level problem and how its hypergradient is taken.

    rule: the inner optimizer (distmaml.meta.rules); steps: K; method: a hypergradient method
    object or its name (distmaml.meta.methods, default settings); checkpoint and
    checkpoint_segment: recompute differentiated steps in the backward pass instead of storing
    them ("none", "every_step", "segments" of checkpoint_segment steps, "auto": about sqrt(K)).
    A rule or setting the method cannot differentiate is refused here, in the one line the
    command line prints too. `progress`, if given, is called with the number of inner steps done
    as the forward pass goes (after each step, or each recomputed segment): a progress bar for long
    unrolls. It does not change what is computed.
    """

    rule: Rule = field(default_factory=lambda: SGD(0.01))
    steps: int = 1
    method: Method | str = field(default_factory=SecondOrder)
    checkpoint: str = "none"
    checkpoint_segment: int | None = None
    progress: Callable[[int], None] | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            object.__setattr__(self, "method", make_method(self.method))
        if not (isinstance(self.steps, int) and self.steps >= 0):
            raise MethodError("inner.steps", self.steps, "must be an integer >= 0")
        if self.checkpoint not in CHECKPOINTS:
            raise MethodError("inner.checkpoint", self.checkpoint, f"must be one of {', '.join(CHECKPOINTS)}")
        if self.checkpoint == "segments" and self.checkpoint_segment is None:
            raise MethodError("inner.checkpoint_segment", None, "inner.checkpoint=segments needs a segment length")
        if self.checkpoint_segment is not None and self.checkpoint_segment < 1:
            raise MethodError("inner.checkpoint_segment", self.checkpoint_segment, "must be >= 1")
        self.method.check(self.rule, self.steps)
