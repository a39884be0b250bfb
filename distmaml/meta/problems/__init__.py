"""Built-in bi-level problems; your own is any object following distmaml.meta.Problem."""

from distmaml.meta.problems.maml import MAML
from distmaml.meta.problems.training import (Dataset, TrainingRun, binary_accuracy, binary_cross_entropy,
                                             class_accuracy, cross_entropy, soft_error)
from distmaml.meta.problems.distillation import Distillation
from distmaml.meta.problems.reweighting import Reweighting
from distmaml.meta.problems.weight_decay import WeightDecay
from distmaml.meta.problems.weighting_net import WeightingNet
from distmaml.meta.problems.learning_to_reweight import LearningToReweight

__all__ = ["MAML", "Dataset", "Distillation", "LearningToReweight", "Reweighting", "TrainingRun", "WeightDecay",
           "WeightingNet", "binary_accuracy", "binary_cross_entropy",
           "class_accuracy", "cross_entropy", "soft_error"]
