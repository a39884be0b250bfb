"""The commands: `train` (the outer loop composing the engine and the run), the `distmaml` command line,
evaluation's, plotting's and the studies' entry points, and the MAML write-up's names.

Layer: the top; nothing below imports from here.
"""
