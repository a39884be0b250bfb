"""Studies: several training runs, each in a fresh process, summarised in one table and plot.

- inner_steps: how the number of inner steps K trades accuracy, over-fitting, time and memory.
- seeds: how a config's result varies over training seeds (and CPU thread counts), with divergence.
"""

from distmaml.commands.study.inner_steps import HEADER, run_inner_steps_study
from distmaml.commands.study.seeds import run_seeds_study

__all__ = ["HEADER", "run_inner_steps_study", "run_seeds_study"]
