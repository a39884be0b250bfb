"""Dataset distillation: a few learned examples per class that train a network from scratch
(Wang et al. 2018), with learned soft labels (Sucholutsky and Schonlau 2019).

    phi = M synthetic inputs per class, their label logits (soft labels: softmax of the logits),
          and the inner rule's learned step sizes (inner.rule = schedule with one block per step)
    start(phi, task)            = a fresh random initialisation from the task's key (or one fixed
                                  initialisation for every task: Wang et al.'s "known init")
    inner_loss(w, phi, task, k) = cross-entropy of the network on the synthetic set against the soft labels
    outer_loss(w, phi, task)    = the loss on a real training mini-batch drawn from the task's key

A batch of tasks is a batch of random initialisations, sharded across processes with one
all-reduce of the examples' gradient -- the pattern of Wang et al.'s own code. The synthetic inputs
start as M random real examples of each class (`initial` = "real") or as Gaussian noise ("noise");
the labels start one-hot (logit `label_scale` on the class). `baselines` are the comparisons:
the same number of real examples chosen at random and the whole training set -- each trained by
plain SGD at its own rate, the one of `baseline_rates` with the best validation accuracy (the
learned step sizes suit the distilled examples, not real ones) --, and the distilled set from one
fixed initialisation with the learned steps.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from distmaml.errors import SettingError
from distmaml.meta.functional import Params
from distmaml.meta.init import fresh_weights
from distmaml.meta.problems.training import TrainingRun
from distmaml.rng import hash_u32, seed_words, uniform

INPUTS, LABELS = "synthetic.x", "synthetic.label_logits"
BASELINE_RATES = tuple(1e-2 * 1e3 ** (i / 12) for i in range(13))  # 0.01 ... 10, four per decade
LANE_OUTER, LANE_PICK, LANE_NOISE = 41, 42, 43


@dataclass(frozen=True, eq=False)
class Distillation(TrainingRun):
    per_class: int = 1
    initial: str = "real"
    label_scale: float = 5.0
    fixed_init: bool = False
    data_seed: int = 0
    classes: int = 0  # 0: from the training labels (a copy on another device keeps the number)

    learned_name = "distilled"
    headline = ("examples_per_class",)
    accuracy_with_ci = True  # evaluation reports each accuracy as a mean over fresh initialisations with its CI
    tuned_baselines = ("random_real", "full")  # trained at their own best rate of baseline_rates
    baseline_rates = BASELINE_RATES

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.initial not in ("real", "noise"):
            raise SettingError("distill.init", self.initial, "must be real or noise")
        if self.classes:  # a copy (to another device, a baseline) of a checked problem
            return
        classes = int(self.data.train_y.max()) + 1
        counts = torch.bincount(self.data.train_y, minlength=classes)
        if not (isinstance(self.per_class, int) and 1 <= self.per_class <= int(counts.min())):
            raise SettingError("distill.per_class", self.per_class, f"must be between 1 and {int(counts.min())} (the "
                               f"fewest real training examples of a class): more synthetic examples than real ones")
        object.__setattr__(self, "classes", classes)

    def real_examples(self, seed: int) -> torch.Tensor:
        """Indices of `per_class` real training examples of each class, chosen counter-based from `seed`."""
        labels = self.data.train_y
        picked = []
        for label in range(self.classes):
            members = (labels == label).nonzero().flatten()
            order = hash_u32(*seed_words(seed), LANE_PICK, members).argsort()
            picked.append(members[order[:self.per_class]])
        return torch.cat(picked)

    def synthetic_from(self, index: torch.Tensor) -> Params:
        labels = self.data.train_y[index]
        logits = self.label_scale * F.one_hot(labels, self.classes).to(self.data.train_x.dtype)
        return {INPUTS: self.data.train_x[index].clone(), LABELS: logits}

    def meta_parameters(self) -> Params:
        phi = {**super().meta_parameters(), **self.synthetic_from(self.real_examples(self.data_seed))}
        if self.initial == "noise":
            x = phi[INPUTS]
            draws = [uniform(0.0, 1.0, *seed_words(self.data_seed), LANE_NOISE, lane, torch.arange(x.numel()),
                             dtype=x.dtype, device=x.device) for lane in (0, 1)]
            normal = torch.sqrt(-2 * torch.log1p(-draws[0])) * torch.cos(2 * math.pi * draws[1])
            phi[INPUTS] = normal.reshape(x.shape)
        return phi

    def start(self, phi: Params, task: Any) -> Params:
        key = task["seed"] * 0 if self.fixed_init else task["seed"]
        return fresh_weights(self.template, key, self.bounds)

    def inner_loss(self, weights: Params, phi: Params, task: Any, step: int) -> torch.Tensor:
        log_probabilities = F.log_softmax(self.predict(weights, phi, phi[INPUTS]), dim=-1)
        return -(F.softmax(phi[LABELS], dim=-1) * log_probabilities).sum(-1).mean()

    def outer_loss(self, weights: Params, phi: Params, task: Any) -> torch.Tensor:
        index = self.batch_index(task, 0, lane=LANE_OUTER)
        x, y = (self.data.train_x, self.data.train_y) if index is None else (self.data.train_x[index],
                                                                              self.data.train_y[index])
        return self.held_out_loss(self.predict(weights, phi, x), y)

    def describe(self, phi: Params) -> dict:
        return {"examples_per_class": self.per_class, "soft_label_confidence": F.softmax(
            phi[LABELS].detach(), -1).max(-1).values.mean().item()}

    def drawing(self, phi: Params) -> tuple[str, dict]:
        """What `distmaml plot` draws of phi: the synthetic examples with their soft labels."""
        return "examples", {"inputs": phi[INPUTS].detach(), "labels": F.softmax(phi[LABELS].detach(), -1)}

    def baselines(self, phi: Params) -> dict[str, tuple[Any, Params]]:
        """(problem, phi) pairs: the real-data ones are trained at their own tuned rate
        (`tuned_baselines`), the fixed initialisation like the learned run."""
        real = self.synthetic_from(self.real_examples(self.data_seed + 1))
        everything = TrainingRun(self.model, self.data, self.loss_fn, self.accuracy_fn, self.batch_size,
                                 self.phi_prefixes)
        return {"random_real": (self, real), "full": (everything, {}),
                "fixed_init": (dataclasses.replace(self, fixed_init=True), phi)}
