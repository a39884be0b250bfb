"""A run on disk: its directory and lock, checkpoints and what they keep, resuming, the logs, the signals
that end in a checkpoint, and what the outer loop keeps between log steps.

Layer: above one iteration (`distmaml.engine`) and the learner; below the commands (`distmaml.commands`).
"""
