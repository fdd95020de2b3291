"""Results of an evaluation as people read them: ``results.json`` (to compare runs), a markdown
and a CSV table, and a PNG plot."""

from __future__ import annotations

import csv
import json
import os


def write_table(out_dir: str, name: str, header: list[str], rows: list[list], meta: dict
                ) -> dict[str, str]:
    """``<name>.md``, ``<name>.csv`` and ``results.json`` (rows keyed by header) in ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {kind: os.path.join(out_dir, f"{name}.{kind}") for kind in ("md", "csv")}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    with open(paths["md"], "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(paths["csv"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    paths["json"] = os.path.join(out_dir, "results.json")
    with open(paths["json"], "w") as f:
        json.dump({**meta, "rows": [dict(zip(header, row)) for row in rows]}, f, indent=1)
    return paths


def _cell(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def plot_lines(path: str, series: dict[str, tuple[list, list]], xlabel: str, ylabel: str,
               title: str, log_x: bool = True, log_y: bool = False) -> str:
    """One line per series ``{label: (xs, ys)}``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if log_x:
        ax.set_xscale("log", base=2)
    if log_y:
        ax.set_yscale("log")
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_heatmaps(path: str, grids: dict[str, list[list[float]]], rows: list, cols: list,
                  xlabel: str, ylabel: str, title: str) -> str:
    """One heatmap per grid ``{label: values[row][col]}`` in [0, 1], side by side, cells
    annotated in percent (passkey: length x depth)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(grids)
    fig, axes = plt.subplots(1, n, figsize=(1.2 + 0.55 * len(cols) * n + 0.6 * n,
                                            1.4 + 0.4 * len(rows)), squeeze=False)
    for ax, (name, values) in zip(axes[0], grids.items()):
        image = ax.imshow(values, vmin=0.0, vmax=1.0, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
        ax.set_yticks(range(len(rows)), [str(r) for r in rows])
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, f"{100 * v:.0f}", ha="center", va="center", fontsize=7)
        ax.set(xlabel=xlabel, ylabel=ylabel, title=name)
    fig.colorbar(image, ax=axes[0].tolist(), fraction=0.03)
    fig.suptitle(title)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_bars(path: str, series: dict[str, list[float]], categories: list[str], ylabel: str,
              title: str) -> str:
    """Grouped bars: one bar per series ``{label: values}`` in each category (e.g. token-class
    shares among kept vs all tokens), annotated with the values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    width = 0.8 / max(len(series), 1)
    fig, ax = plt.subplots(figsize=(1.5 + 1.3 * len(categories), 4.5))
    for i, (label, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        bars = ax.bar(xs, values, width, label=label)
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(range(len(categories)), categories, rotation=20, ha="right")
    ax.set(ylabel=ylabel, title=title)
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
