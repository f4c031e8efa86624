"""Plots of a run, drawn from its metrics.jsonl alone, so they can be redrawn without retraining.

    python -m dnilab.plots results/mlp_dni [results/mlp_cdni ...]

writes loss.png (classification loss), sg_loss.png (synthetic-gradient loss per stage,
log scale; the seed's two plots) of a DNI run or aux_loss.png (auxiliary loss per stage) of a
local-losses run, and test_acc.png in each run folder.
"""
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

try:
    import seaborn
    seaborn.set_theme(style="whitegrid")
except ImportError:
    pass

from dni.errors import DNIError  # noqa: E402
from dnilab.runs import metrics_rows  # noqa: E402


def read_metrics(run_dir):
    """(step lines, epoch lines) of a run's metrics.jsonl."""
    lines = metrics_rows(run_dir)
    return [m for m in lines if m["kind"] == "step"], [m for m in lines if m["kind"] == "epoch"]


def smooth(values, window):
    """Running mean over `window` steps, so per-step noise does not hide the trend."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def _save(fig, ax, path, title, xlabel, ylabel, log=False):
    ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
    if log:
        ax.set_yscale("log")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_run(run_dir):
    """Draw the run's PNGs; returns their paths."""
    run_dir = Path(run_dir)
    steps, epochs = read_metrics(run_dir)
    name, window = run_dir.name, max(1, len(steps) // 100)
    x = [m["step"] for m in steps]
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(x, smooth([m["loss"] for m in steps], window))
    _save(fig, ax, run_dir / "loss.png", f"{name}: classification loss", "step", "cross-entropy", log=True)
    paths.append(run_dir / "loss.png")

    if steps and "sg_loss" in steps[0]:
        fig, ax = plt.subplots(figsize=(6, 4))
        for i in range(len(steps[0]["sg_loss"])):
            ax.plot(x, smooth([m["sg_loss"][i] for m in steps], window), label=f"synthesizer {i + 1}")
        _save(fig, ax, run_dir / "sg_loss.png", f"{name}: synthetic-gradient loss", "step",
              "L2 to target gradient", log=True)
        paths.append(run_dir / "sg_loss.png")

    if steps and "aux_loss" in steps[0]:  # local losses (runs written before them have none)
        fig, ax = plt.subplots(figsize=(6, 4))
        for i in range(len(steps[0]["aux_loss"])):
            ax.plot(x, smooth([m["aux_loss"][i] for m in steps], window), label=f"head {i + 1}")
        _save(fig, ax, run_dir / "aux_loss.png", f"{name}: auxiliary loss", "step", "cross-entropy", log=True)
        paths.append(run_dir / "aux_loss.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([m["step"] for m in epochs], [100 * m["test_acc"] for m in epochs], marker="o")
    _save(fig, ax, run_dir / "test_acc.png", f"{name}: test accuracy", "step", "test accuracy (%)")
    paths.append(run_dir / "test_acc.png")
    return paths


def main(argv=None):
    run_dirs = (argv if argv is not None else sys.argv[1:])
    if not run_dirs:
        raise DNIError("usage: python -m dnilab.plots RUN_DIR [RUN_DIR ...]")
    for run_dir in run_dirs:
        for path in plot_run(run_dir):
            print(path)


if __name__ == "__main__":
    from dnilab.cli import main_guard
    main_guard(main)
