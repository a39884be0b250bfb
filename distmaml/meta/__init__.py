"""The mathematics of bi-level optimization as pure functions: tensors in, tensors out, no processes,
files or logs.

    problem = MAML(model, loss_fn)                        # or WeightDecay(...), or your own Problem
    inner = Inner(rule=make_rule("meta_sgd", lr=0.01), steps=5, method="second_order")
    phi = meta_parameters(problem, inner)                 # the problem's entries + learned step sizes
    result = meta_gradient(problem, phi, tasks, inner)    # sum over tasks of d L_out / d phi

Importing distmaml.meta loads torch and nothing of the trainer (no tqdm, yaml or logging set-up).
"""

from distmaml.meta.checkpointing import CHECKPOINTS, plan_segments
from distmaml.meta.functional import (LossFn, MetaGradient, Params, TaskBatch, Tasks, detached, functional_forward,
                                      mse, num_tasks, task_at, tasks_slice)
from distmaml.meta.gradient import check_method, meta_gradient, meta_parameters
from distmaml.meta.inner import Inner
from distmaml.meta.methods import (CG, METHODS, FiniteDifference, FirstOrder, Implicit, ImplicitCG, Method, MethodError,
                                   Neumann, NeumannSeries, Reptile, SecondOrder, Solver, Truncated, make_method,
                                   method_settings, unrolled_objective)
from distmaml.meta.problem import Problem, ProblemError, check_problem
from distmaml.meta.problems import (MAML, Dataset, Distillation, LearningToReweight, Reweighting, TrainingRun,
                                    WeightDecay, WeightingNet)
from distmaml.meta.reference import inner_loop, meta_gradient_loop, reference_unroll
from distmaml.meta.rules import LEARNED, RULES, BaseRule, Rule, learned_names, make_rule, rule_settings
from distmaml.meta.unrolling import Unrolled, start_weights, step_views, task_values, unroll

meta_loss = unrolled_objective  # (objective [n], outer loss after the last step [n], weights): MAML's name

__all__ = [
    "BaseRule", "CG", "CHECKPOINTS", "LEARNED", "MAML", "METHODS", "RULES", "Dataset", "Distillation", "FiniteDifference",
    "FirstOrder", "Implicit", "ImplicitCG", "Inner", "LossFn", "Method", "MethodError", "MetaGradient", "Neumann",
    "NeumannSeries", "Params", "Problem", "ProblemError", "Reptile", "Reweighting", "Rule", "SecondOrder", "Solver",
    "TaskBatch", "Tasks", "TrainingRun", "Truncated", "Unrolled", "WeightDecay", "WeightingNet", "LearningToReweight",
    "check_method", "check_problem", "detached", "functional_forward", "inner_loop", "learned_names", "make_method",
    "make_rule", "method_settings", "meta_gradient", "meta_gradient_loop", "meta_loss", "meta_parameters", "mse", "num_tasks",
    "plan_segments", "reference_unroll", "rule_settings", "start_weights", "step_views", "task_at", "task_values", "tasks_slice",
    "unroll", "unrolled_objective",
]
