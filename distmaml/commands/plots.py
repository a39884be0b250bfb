"""Pictures of adaptation (matplotlib, imported only when a plot is asked for)."""

from __future__ import annotations

from pathlib import Path

import torch

from distmaml.errors import ConfigError
from distmaml.evaluate import adaptation_weights
from distmaml.files import check_file_path, write_figure
from distmaml.meta import Inner
from distmaml.rng import STREAM_PLOT

STEPS = (1, 10)  # inner steps drawn besides the start, as the paper's figure
PANEL_INCHES, DPI = 4.5, 120
# Panels sit side by side, and matplotlib draws no image wider than 2**16 pixels.
MAX_TASKS = 2 ** 16 // int(PANEL_INCHES * DPI) - 1


def check_output(path: str | Path, what: str) -> str:
    """The image format `path` asks for by its extension (PNG without one), refusing before any work an
    unknown format or a path that cannot be written."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    path = Path(path)
    image_format = path.suffix[1:].lower() or "png"
    known = Figure().canvas.get_supported_filetypes()
    if image_format not in known:
        raise ConfigError(f"{what} = {path}: .{image_format} is not an image format matplotlib writes (it writes "
                          f"{', '.join('.' + name for name in sorted(known))})")
    check_file_path(path, what)
    return image_format


def plot_sine_adaptation(problem, theta, family, inner: Inner, out: str | Path, tasks: int = 3,
                         shots: int | None = None, steps: tuple[int, ...] = STEPS, image_format: str = "png") -> None:
    """The MAML paper's Figure 2: for a few fresh sine tasks, the true function, the K support
    points, the meta-learned prediction before adaptation and after 1 and 10 inner steps (with the
    run's own inner rule), written to `out` exactly, in `image_format`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if family.is_classification:
        raise ValueError("distmaml plot draws sine regression tasks; this run is a classification run")
    device = next(iter(theta.values())).device
    indices = torch.arange(tasks, device=device)
    batch = family.sample(STREAM_PLOT, 0, indices, support=shots)
    grid = torch.linspace(family.x_range[0], family.x_range[1], 200, device=device, dtype=family.dtype)
    truth = family.curve(STREAM_PLOT, 0, indices, grid)

    trajectory = adaptation_weights(problem, theta, batch, inner, [0, *steps])
    predictions = {}
    with torch.no_grad():
        for k in (0, *steps):
            predictions[k] = [problem.predict({name: value[i] for name, value in trajectory[k].items()}, theta,
                                              grid[:, None]) for i in range(tasks)]

    figure, axes = plt.subplots(1, tasks, figsize=(PANEL_INCHES * tasks, 3.6), squeeze=False)
    for i, axis in enumerate(axes[0]):
        axis.plot(grid.cpu(), truth[i, :, 0].cpu(), color="black", lw=2, label="ground truth")
        axis.scatter(batch.support_x[i, :, 0].cpu(), batch.support_y[i, :, 0].cpu(), color="tab:purple",
                     marker="^", s=40, zorder=3, label=f"{batch.support_x.shape[1]} support points")
        for k, style in zip(sorted(predictions), (":", "--", "-", "-.")):
            label = "pre-update" if k == 0 else f"{k} grad step{'s' if k > 1 else ''}"
            axis.plot(grid.cpu(), predictions[k][i][:, 0].cpu(), ls=style, lw=1.6, label=label)
        axis.set_title(f"fresh task {i}")
        axis.set_xlabel("x")
    axes[0][0].legend(fontsize=8, loc="lower left")
    figure.tight_layout()
    write_figure(out, figure, dpi=DPI, format=image_format)
    plt.close(figure)


def plot_function(data: dict, out: str | Path, image_format: str = "png") -> None:
    """A learned activation function (its values `learned` at `x`) beside ELU, ReLU and Swish, and
    the learned offset g(x) = f(x) - elu(x)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, learned = data["x"].cpu(), data["learned"].cpu()
    reference = {"ELU": torch.nn.functional.elu(x), "ReLU": torch.relu(x), "Swish": torch.nn.functional.silu(x)}
    figure, (left, right) = plt.subplots(1, 2, figsize=(9, 3.6))
    left.plot(x, learned, color="black", lw=2.2, label="learned")
    for (name, values), style in zip(reference.items(), (":", "--", "-.")):
        left.plot(x, values, ls=style, lw=1.4, label=name)
    left.set_title("activation function")
    left.legend(fontsize=8)
    right.plot(x, learned - reference["ELU"], color="black", lw=2)
    right.axhline(0, color="grey", lw=0.8)
    right.set_title("learned offset f(x) - elu(x)")
    for axis in (left, right):
        axis.set_xlabel("x")
    figure.tight_layout()
    write_figure(out, figure, dpi=120, format=image_format)
    plt.close(figure)


def plot_examples(data: dict, out: str | Path, image_format: str = "png") -> None:
    """Learned examples (`inputs`, with `labels` as class probabilities: distilled data): images where
    an example is square (8 x 8 digits, or [channels, h, w]), else sequences (MNIST-1D), each titled
    with its soft label."""
    import math

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, labels = data["inputs"].cpu(), data["labels"].cpu()
    count, size = x.shape[0], math.prod(x.shape[1:])
    side = math.isqrt(size) if x.dim() == 2 else None
    columns = min(count, 10)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(1.6 * columns, 1.7 * rows), squeeze=False)
    for i, axis in enumerate(axes.flat):
        axis.set_xticks([])
        axis.set_yticks([])
        if i >= count:
            axis.axis("off")
            continue
        example = x[i]
        if x.dim() == 4:
            axis.imshow(example.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray")
        elif side is not None and side * side == size and side > 1:
            axis.imshow(example.reshape(side, side).numpy(), cmap="gray")
        else:
            axis.plot(example.reshape(-1).numpy(), color="black", lw=1)
        confidence, label = labels[i].max(0)
        axis.set_title(f"{int(label)} ({float(confidence):.2f})", fontsize=8)
    figure.suptitle("distilled examples: soft label's class (its probability)", fontsize=9)
    figure.tight_layout()
    write_figure(out, figure, dpi=120, format=image_format)
    plt.close(figure)


# What a problem's drawing(phi) can ask for (distmaml.meta.Problem): its kind, and the figure that shows it.
DRAWINGS = {"function": plot_function, "examples": plot_examples}
