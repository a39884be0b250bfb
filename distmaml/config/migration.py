"""Configs saved or written by earlier versions, read in today's keys and meaning what they meant.

A key that moved with its meaning (RENAMED) is read as its new name, with a warning where a person
wrote it (a file, the command line) and silently from a saved run (a checkpoint's config); one whose
meaning changed (MOVED) is refused in a file and migrated in a saved run; a key added later takes,
in a saved run, the value that reproduces what that run did (ADDED_LATER).
"""

from __future__ import annotations

import logging
from typing import Any

from distmaml.config.schema import PROBLEM_SECTIONS

log = logging.getLogger("distmaml.config")

# Version 0.1 applied implicit.lam (as iMAML's proximal term) in these modes only. A saved config's
# inner.mode is data here, not a dispatch: the migration must redo what that version did for it.
VERSION_0_1_PROXIMAL_MODES = frozenset({"implicit"})

# Keys whose meaning changed when they moved: an old config file is told where they went (and
# refused: the old value would mean something else); an old checkpoint's config is migrated.
MOVED = {"implicit.lam": "maml.proximal", "implicit.cg_damping": "implicit.damping (now added to the inner "
         "Hessian itself: lam times the old value)"}

# Keys that moved with their meaning unchanged (each problem's settings to its own section, and
# the training runs' shared ones to training_run): in a file, on the command line or in from_flat
# they are read as the new key with a one-line warning; a saved config is migrated silently.
RENAMED = {
    "problem.proximal": "maml.proximal",
    "problem.batch_size": "training_run.batch_size",
    "problem.outer": "training_run.outer",
    "problem.decay_per": "weight_decay.per",
    "problem.decay_init": "weight_decay.init",
    "problem.example_init": "hyperclean.init",
    "problem.example_weighting": "hyperclean.weighting",
    "problem.per_class": "distill.per_class",
    "problem.distill_init": "distill.init",
    "problem.fixed_init": "distill.fixed_init",
}

# Keys added after runs were saved, with the value that reproduces what such a run did: a saved
# config whose problem reads the key's section and that lacks the key gets this value.
# (A hyperclean run saved before its weighting was a setting trained on the plain mean.)
ADDED_LATER = {"hyperclean.weighting": "mean"}

def renamed(key: str, where: str) -> str:
    """Today's name of `key`, saying so once where an old one was given."""
    new = RENAMED.get(key)
    if new is None:
        return key
    log.warning("%s: %s is %s now; read as %s", where, key, new, new)
    return new


def migrated(raw: dict[str, Any]) -> dict[str, Any]:
    """A saved config in today's keys, meaning what it meant when the run was saved.

    Each problem's settings were keys of problem: (RENAMED). Version 0.1's implicit.lam was iMAML's
    proximal strength, and implicit.cg_damping was added to I + H / lam: today the proximal term
    belongs to the maml problem and the damping to H itself. A key added later takes the value that
    reproduces the run (ADDED_LATER)."""
    for old, new in RENAMED.items():
        if old in raw:
            raw.setdefault(new, raw.pop(old))
    # Keyed on the saved run's problem through the table of what each problem reads: data migration
    # (what that run did), not a choice of behaviour by name.
    read = PROBLEM_SECTIONS.get(raw.get("problem.name"), ())
    for key, value in ADDED_LATER.items():
        if key.split(".", 1)[0] in read:
            raw.setdefault(key, value)
    if "training_run" not in read:
        # Accepted and ignored before it was refused for such problems: the run never read it.
        for key in [key for key in raw if key.startswith("training_run.")]:
            del raw[key]
    lam = raw.pop("implicit.lam", None)
    damping = raw.pop("implicit.cg_damping", None)
    if lam is not None and raw.get("inner.mode") in VERSION_0_1_PROXIMAL_MODES:
        raw["maml.proximal"] = lam
        if damping:
            raw["implicit.damping"] = lam * damping
    return raw
