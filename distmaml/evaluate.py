"""Adaptation to fresh tasks: the test-time half of a bi-level problem, and the numbers papers report.

For MAML the tasks are new few-shot tasks and the report is the query loss (and accuracy) after
0..S inner steps; for a training-run problem (weight_decay) they are new random initialisations
trained with the learned phi, reported on the validation and test splits. Both are the same
computation: adapt fresh tasks of the evaluation stream as the run's method adapts, and measure
the problem's metrics along the way. Only few-shot tasks have shots and a query set to size (the
family's `episodic`, distmaml.tasks.TaskFamily); a number of either is refused for the others.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from torch import nn

from distmaml.errors import ConfigError
from distmaml.meta import (LEARNED, MAML, Inner, Params, TaskBatch, Tasks, detached, make_rule, mse, start_weights,
                           task_values)
from distmaml.rng import STREAM_EVAL
from distmaml.tasks.protocol import is_episodic

CURVE_POINTS = 10  # a long unroll is reported after this many evenly spaced numbers of steps (and 0)
# A trained model whose adaptation diverges on more than this fraction of fresh tasks has not learned
# to adapt: the run that made it is reported as diverged, not complete.
DIVERGED_RUN_FRACTION = 0.5


def report_steps(steps: int) -> list[int]:
    """The numbers of inner steps an evaluation reports: every one up to 20, else 0 and ten evenly spaced."""
    if steps <= 2 * CURVE_POINTS:
        return list(range(steps + 1))
    return sorted({round(steps * point / CURVE_POINTS) for point in range(CURVE_POINTS + 1)})


def task_metrics(problem, weights: Params, phi: Params, tasks: Tasks) -> dict[str, torch.Tensor]:
    """The problem's metrics of every task at its weights (task dimension first): {name: [n]}."""
    with torch.no_grad():
        return task_values(problem.metrics, weights, detached(phi), tasks)


def adaptation_weights(problem, theta: Params, tasks: Tasks, inner: Inner, steps: list[int]) -> dict[int, Params]:
    """Every task's inner weights after each number of inner steps in `steps` (0: the start).

    The tasks adapt as the run's method adapts them (the learned rule, the implicit methods'
    safeguard), without a graph."""
    counts = sorted({s for s in steps if s})
    adapted = inner.method.adapt(problem, theta, tasks, inner, max(steps), trajectory=frozenset(counts))
    with torch.no_grad():
        by_count = {0: start_weights(problem, detached(theta), tasks)}
    by_count.update(zip(counts, adapted.trajectory))
    return by_count


def adaptation_curves(problem, theta: Params, tasks: Tasks, inner: Inner, steps: list[int]) -> dict[str, torch.Tensor]:
    """The problem's metrics of every task after each number of inner steps in `steps`: {name: [len(steps), n]}."""
    by_count = adaptation_weights(problem, theta, tasks, inner, steps)
    curves = [task_metrics(problem, by_count[count], theta, tasks) for count in steps]
    return {name: torch.stack([c[name] for c in curves]) for name in curves[0]}


def test_adaptation(model: nn.Module, new_task: TaskBatch, theta: Params | None = None, inner: Inner | None = None,
                    steps: int = 10, loss_fn=mse) -> list[float]:
    """One new task's query loss after 0, 1, ..., `steps` inner steps (the MAML write-up's name).

    `new_task` is one task's (support_x, support_y, query_x, query_y) without a task dimension;
    `theta` defaults to the model's own parameters, `inner` to SGD steps at 0.01, the loss to MSE.
    """
    theta = dict(model.named_parameters()) if theta is None else theta
    inner = Inner() if inner is None else inner
    batch = TaskBatch(*(t.unsqueeze(0) for t in new_task))
    curves = adaptation_curves(MAML(model, loss_fn), theta, batch, inner, list(range(steps + 1)))
    return curves["loss"][:, 0].tolist()


test_adaptation.__test__ = False  # a public API name, not a pytest test


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and half-width of its 95% confidence interval (normal approximation, n >= 2)."""
    values = values.double()
    return values.mean().item(), 1.96 * values.std().item() / math.sqrt(values.numel())


def diverged_tasks(losses: torch.Tensor, factor: float) -> torch.Tensor:
    """[steps + 1, n] -> [steps + 1, n] bool: each task's query loss is non-finite, or has risen from
    its value before adaptation (row 0) by more than (factor - 1) times its scale: the larger of that
    value's magnitude and the median magnitude over the n tasks.

    Relative, so one threshold serves sine MSEs and cross entropies alike: adaptation that leaves a
    task 10x worse than an unadapted model typically is has blown up. The median floor keeps a task
    that starts near zero (a flat sine) from being called diverged for a bounded rise to an
    ordinary loss, which would withhold a mean that nothing blew up. Magnitudes, so that a loss that
    can be negative (a log-likelihood) is measured the same way.
    """
    start = losses[:1].abs()
    scale = torch.maximum(start, start.median())
    return ~torch.isfinite(losses) | (losses - losses[:1] > (factor - 1) * scale)


def distribution(values: torch.Tensor) -> dict[str, float]:
    """Mean with its 95% CI, median and quartiles of one metric over tasks; non-finite values rank
    highest, and a statistic they make non-finite becomes NaN (null in JSON, "diverged" in tables)."""
    values = values.double()
    ranked = torch.where(torch.isfinite(values), values, torch.full_like(values, math.inf)).sort().values
    mean, ci95 = mean_ci95(values) if bool(torch.isfinite(values).all()) else (math.nan, math.nan)
    out = {"": mean, "_ci95": ci95}
    for name, q in (("_median", 0.5), ("_q25", 0.25), ("_q75", 0.75)):
        # Linear interpolation between order statistics; an infinite neighbour makes it infinite.
        position = q * (len(ranked) - 1)
        low, high = ranked[math.floor(position)].item(), ranked[math.ceil(position)].item()
        out[name] = low if low == high else low + (position - math.floor(position)) * (high - low)
    out["_max"] = ranked[-1].item()
    return {key: value if math.isfinite(value) else math.nan for key, value in out.items()}


def _curves(problem, theta: Params, batches: list, inner: Inner, counts: list[int]) -> dict[str, torch.Tensor]:
    per_chunk = [adaptation_curves(problem, theta, batch, inner, counts) for batch in batches]
    return {name: torch.cat([c[name] for c in per_chunk], dim=1) for name in per_chunk[0]}


def refuse_shots(family, settings: dict[str, Any], names: dict[str, str], family_name: str | None = None) -> None:
    """Refuse, in one line naming the flag or key (`names`: {"shots": "--shots", "query": "--query"}), a
    number of shots or query examples in `settings` for a family whose tasks have neither (its
    `episodic` is False: a task is a training run on the family's fixed data set). `family_name` is
    the family as the config names it (default: its class)."""
    if is_episodic(family):
        return
    name = family_name or type(family).__name__
    for key, missing in (("shots", "shots"), ("query", "query set to size")):
        value = settings.get(key)
        if value is not None and value != []:
            shown = " ".join(map(str, value)) if isinstance(value, (list, tuple)) else value
            raise ConfigError(f"{names[key]} = {shown}: the tasks of family {name} are training runs on a fixed data "
                              f"set, not few-shot tasks; they have no {missing}")


def evaluate(problem, theta: Params, family, inner: Inner, steps: int, tasks: int = 600,
             shots: int | None = None, query: int | None = None, stream: int = STREAM_EVAL,
             chunk: int = 200, seed: int | None = None, diverged_factor: float = 10.0,
             lr_grid: list[float] = ()) -> dict[str, Any]:
    """Adapt `tasks` fresh tasks; each metric's distribution over tasks after each reported step.

    `seed` chooses the tasks (default: the family's own seed); a run's evaluation uses eval.seed,
    the same for every training seed, so that runs are compared on the same tasks. Each row gives,
    per metric, its mean and 95% CI, median and quartiles; for the outer loss also the worst task
    and how many tasks diverged (`diverged_tasks`). Statistics that are not finite are NaN. Where
    the problem reports a test accuracy, the result also holds its mean after the last step
    ("test_accuracy"), the learned values of phi ("learned"), and with `lr_grid` the same tasks
    trained by plain SGD at each of those fixed rates instead ("grid": a grid search beside them).

    "shots" is the support examples per task of few-shot tasks, null for training runs (whose
    `shots` and `query` are refused), which give "training_examples" instead: the size of the
    family's training split. Where `steps` runs past the steps the rule's learned parameters were
    trained for, "beyond_trained_steps" says what those steps use (the rule's `beyond`).
    """
    refuse_shots(family, {"shots": shots, "query": query}, {"shots": "shots", "query": "query"})
    if seed is not None:
        family = family.with_seed(seed)
    device = next(iter({**theta, **problem.inner_template()}.values())).device  # theta may be empty (a baseline)
    counts = report_steps(steps)
    batches = [family.sample(stream, 0, torch.arange(start, min(start + chunk, tasks), device=device),
                             support=shots, query=query) for start in range(0, tasks, chunk)]
    curves = _curves(problem, theta, batches, inner, counts)
    diverged = diverged_tasks(curves["loss"], diverged_factor).sum(1)
    rows = []
    for row_index, count in enumerate(counts):
        row: dict[str, Any] = {"step": count}
        for name, values in curves.items():
            stats = distribution(values[row_index])
            if name != "loss":
                stats = {key: stats[key] for key in ("", "_ci95", "_median", "_q25", "_q75")}
            row.update({name + key: value for key, value in stats.items()})
        row["diverged"] = int(diverged[row_index])
        row["diverged_fraction"] = int(diverged[row_index]) / tasks
        rows.append(row)
    episodic = is_episodic(family)
    result = {"tasks": tasks, "shots": (shots if shots is not None else family.support) if episodic else None,
              "rule": inner.rule.name, "inner_lr": inner.rule.lr, "outer": getattr(problem, "outer_name", "outer"),
              "diverged_factor": diverged_factor, "steps": rows}
    if not episodic:
        result["training_examples"] = family.support
    beyond = getattr(inner.rule, "beyond", None)  # optional: rules whose learned parameters belong to steps
    note = beyond(theta, steps) if beyond is not None else None
    if note:
        result["beyond_trained_steps"] = note
    if "test_accuracy" in rows[-1]:
        result["test_accuracy"] = rows[-1]["test_accuracy"]
    learned = {**(problem.describe(theta) if hasattr(problem, "describe") else {}), **inner.rule.describe(theta)}
    if learned:
        result["learned"] = learned
        result.update({key: learned[key] for key in getattr(problem, "headline", ()) if key in learned})
    if hasattr(problem, "baselines"):
        result["test_accuracy"], tuned_rates = compare_with_baselines(problem, theta, batches, inner, counts, curves)
        if tuned_rates:
            result["baseline_lr"] = tuned_rates
    if lr_grid:
        result["grid"] = rate_grid(problem, theta, batches, inner, steps, lr_grid)
    return result


def compare_with_baselines(problem, theta: Params, batches: list, inner: Inner, counts: list[int],
                           curves: dict[str, torch.Tensor]) -> tuple[dict[str, Any], dict[str, float]]:
    """The learned run's test accuracy beside its problem's baselines (problem.baselines(theta): the
    same tasks trained on other data, with the same rule and learned step sizes), and the rate each
    tuned baseline was trained at. A baseline the problem names in `tuned_baselines` is trained by
    plain SGD at each of `problem.baseline_rates` instead and reported at the rate with the best
    validation accuracy. A baseline it names in `stopped_baselines` is also reported stopped at its
    best validation accuracy (the strongest simple baseline), its last step as "<name>_unstopped"."""
    rates = {name: value for name, value in theta.items() if name.startswith(LEARNED)}
    with_ci = getattr(problem, "accuracy_with_ci", False)

    def at(values: torch.Tensor, row: int):
        mean, ci95 = mean_ci95(values[row])
        return {"mean": mean, "ci95": ci95} if with_ci else mean

    out, tuned_rates = {getattr(problem, "learned_name", "learned"): at(curves["test_accuracy"], -1)}, {}
    for name, (other, phi) in problem.baselines(theta).items():
        if name in getattr(problem, "tuned_baselines", ()):
            tuned_rates[name], found = _best_rate(other, phi, batches, inner, counts, problem.baseline_rates)
        else:
            found = _curves(other, {**rates, **phi}, batches, inner, counts)
        out[name] = at(found["test_accuracy"], -1)
        if name in getattr(problem, "stopped_baselines", ()):
            best = int(found["accuracy"].mean(1).argmax())
            out[f"{name}_unstopped"], out[name] = out[name], at(found["test_accuracy"], best)
    return out, tuned_rates


def _at_rates(problem, phi: Params, batches: list, inner: Inner, counts: list[int], rates):
    """(rate, curves) for the same tasks trained by plain SGD at each fixed rate, one rate at a time."""
    for rate in rates:
        yield rate, _curves(problem, phi, batches, dataclasses.replace(inner, rule=make_rule("sgd", rate)), counts)


def _best_rate(problem, phi: Params, batches: list, inner: Inner, counts: list[int],
               rates: tuple[float, ...]) -> tuple[float, dict[str, torch.Tensor]]:
    """The rate of `rates` whose plain-SGD training reaches the best mean validation accuracy after
    the last step (a diverged rate scores lowest), with that training's curves."""
    best_score, best_rate, best_curves = -math.inf, rates[0], None
    for rate, found in _at_rates(problem, phi, batches, inner, counts, rates):
        score = found["accuracy"][-1].double().mean().item()
        score = score if math.isfinite(score) else -math.inf
        if best_curves is None or score > best_score:
            best_score, best_rate, best_curves = score, rate, found
    return best_rate, best_curves


def rate_grid(problem, theta: Params, batches: list, inner: Inner, steps: int, rates: list[float]) -> dict[str, Any]:
    """The same tasks trained for `steps` steps of plain SGD at each fixed rate: the grid search a
    learned rate is compared with. Accuracy is the test split's where the problem has one."""
    fixed = {name: value for name, value in theta.items() if not name.startswith(LEARNED)}  # no learned rates
    accuracy, loss, outer, validation_accuracy = [], [], [], []
    for _, curves in _at_rates(problem, fixed, batches, inner, [steps], rates):
        metric = curves.get("test_accuracy", curves.get("accuracy", -curves["loss"]))
        accuracy.append(distribution(metric[-1])[""])
        loss.append(distribution(curves["loss"][-1])[""])
        outer.append(distribution(curves.get("outer_loss", curves["loss"])[-1])[""])
        if "accuracy" in curves:
            validation_accuracy.append(distribution(curves["accuracy"][-1])[""])
    # The grid's choice is made as hyperparameter learning makes it: by the outer loss on validation data.
    finite = [(value, rate) for value, rate in zip(outer, rates) if math.isfinite(value)]
    best = min(finite)[1] if finite else None
    out = {"lrs": list(rates), "test_accuracy": accuracy, "validation_loss": loss, "best_lr": best,
           "test_accuracy_at_best": accuracy[list(rates).index(best)] if best is not None else None}
    if outer != loss:
        out["validation_outer_loss"] = outer
    if validation_accuracy:
        out["validation_accuracy"] = validation_accuracy
    return out


def evaluation_settings(config) -> dict[str, Any]:
    """evaluate()'s keyword arguments (beyond problem, theta, family and inner) as a run's config asks for them."""
    return dict(steps=config.eval.steps, tasks=config.eval.tasks, shots=config.eval.shots, query=config.eval.query,
                seed=config.eval.seed, diverged_factor=config.eval.diverged_factor, lr_grid=config.eval.lr_grid)


def evaluated(result: dict[str, Any]) -> str:
    """What an evaluation evaluated, for its header: "600 fresh tasks, 5-shot", or "20 fresh training
    runs of 30 inner steps on a data set of 1078 training examples"."""
    if result["shots"] is not None:
        return f"{result['tasks']} fresh tasks, {result['shots']}-shot"
    return (f"{result['tasks']} fresh training runs of {result['steps'][-1]['step']} inner steps on a data set of "
            f"{result['training_examples']} training examples")


def _number(value: float, scale: float = 1.0, unit: str = "") -> str:
    return f"{value * scale:.4f}{unit}" if math.isfinite(value) else "diverged"


def format_table(result: dict[str, Any]) -> str:
    """The evaluation as a Markdown table, one row per number of inner steps.

    A mean is printed only where no task diverged: otherwise one task's 1e22 would stand in for
    the whole evaluation, so the cell says how many diverged and the median carries the result.
    """
    names = [k for k in result["steps"][0] if f"{k}_median" in result["steps"][0]]
    header = ["steps"]
    outer = result.get("outer", "query")
    for name in names:
        label = name.replace("_", " ") if "_" in name else f"{outer} {name}"
        header += [f"{label} (mean ± 95% CI)", f"{label} (median [IQR])"]
    header.append("diverged tasks")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in result["steps"]:
        cells = [str(row["step"])]
        for name in names:
            scale, unit = (100.0, " %") if name.endswith("accuracy") else (1.0, "")
            blown = not name.endswith("accuracy") and row["diverged"] > 0
            if blown or not math.isfinite(row[name]):
                cells.append(f"diverged ({row['diverged']} tasks)")
            else:
                cells.append(f"{_number(row[name], scale)} ± {_number(row[name + '_ci95'], scale)}{unit}")
            cells.append(f"{_number(row[name + '_median'], scale, unit)} [{_number(row[name + '_q25'], scale)}, "
                         f"{_number(row[name + '_q75'], scale)}]")
        cells.append(f"{row['diverged']} / {result['tasks']}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def divergence_warning(result: dict[str, Any]) -> str | None:
    """One line saying how many tasks diverged and from which step on, or None when none did."""
    bad = [row for row in result["steps"] if row["diverged"]]
    if not bad:
        return None
    worst = max(row["diverged"] for row in bad)
    return (f"{worst} of {result['tasks']} tasks diverged within {result['steps'][-1]['step']} step(s), the first "
            f"at step {bad[0]['step']} (query loss non-finite or above {result['diverged_factor']:g}x its value "
            "before adaptation, or the median task's if larger); means are not reported for those steps, medians are")


def diverged_evaluation(result: dict[str, Any]) -> str | None:
    """One line saying where more than DIVERGED_RUN_FRACTION of the tasks had diverged, or None."""
    row = next((row for row in result["steps"] if row["diverged"] > DIVERGED_RUN_FRACTION * result["tasks"]), None)
    if row is None:
        return None
    return (f"the evaluation diverged: {row['diverged']} of {result['tasks']} fresh tasks diverged by inner step "
            f"{row['step']} ({result.get('outer', 'query')} loss non-finite or above eval.diverged_factor = {result['diverged_factor']:g} "
            f"times its value before adaptation), more than {DIVERGED_RUN_FRACTION:.0%} of them")


def final_line(result: dict[str, Any]) -> str:
    """The evaluation in one line: before adaptation and after the last step, never a blown-up mean."""
    first, last = result["steps"][0], result["steps"][-1]
    after = (f"{_number(last['loss'])} after {last['step']} step(s) (median {_number(last['loss_median'])})"
             if not last["diverged"] else
             f"median {_number(last['loss_median'])} after {last['step']} step(s), with {last['diverged']} of "
             f"{result['tasks']} tasks diverged")
    outer = result.get("outer", "query")
    return f"eval on {result['tasks']} fresh tasks: {outer} loss {_number(first['loss'])} before adaptation, {after}"
