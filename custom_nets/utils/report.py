"""Plots of TensorBoard scalars and the demo's Markdown report."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from custom_nets.utils.io import atomic_path


def read_scalars(logdir: str | Path) -> dict[str, list[tuple[int, float]]]:
    """All scalar series under a TensorBoard log folder: {tag: [(step, value), ...]} sorted by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    series: dict[str, dict[int, float]] = {}
    for events in sorted(Path(logdir).rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for ev in acc.Scalars(tag):
                series.setdefault(tag, {})[ev.step] = ev.value
    return {tag: sorted(points.items()) for tag, points in series.items()}


def plot_scalars(logdir: str | Path, out_png: str | Path, title: str, tags: Sequence[str] | None = None) -> Path | None:
    """Plot the scalar series of ``logdir`` (one panel per tag) into ``out_png``; None if there are none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = read_scalars(logdir)
    if tags is not None:
        series = {t: v for t, v in series.items() if t in tags}
    series = {t: v for t, v in series.items() if v}
    if not series:
        return None
    n = len(series)
    cols = min(n, 4)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
    for ax, (tag, points) in zip(axes.flat, sorted(series.items())):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 30 else None)
        ax.set_title(tag, fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    with atomic_path(out_png) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return Path(out_png)
