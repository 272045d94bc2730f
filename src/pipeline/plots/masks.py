"""Weight-mask modularity figures: per-layer sharing and IoU, sharing vs size, confusion
differences. Each reads the tables :func:`pipeline.masks.study.analyse` writes."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.plots import register_figure
from pipeline.plots.style import grid, point_label, pyplot, save


def _layers(table: pd.DataFrame) -> pd.DataFrame:
    """Per-layer rows then the ``total`` row, in the table's (forward) order."""
    return table[table.kind.isin(["layer", "total"])]


def _bars(ax, frame: pd.DataFrame, group: str, value: str, label: str) -> None:
    layers = list(dict.fromkeys(frame.layer))
    groups = list(dict.fromkeys(frame[group]))
    width = 0.8 / max(len(groups), 1)
    x = np.arange(len(layers))
    for i, g in enumerate(groups):
        rows = frame[frame[group] == g].groupby("layer", sort=False)[value]
        mean = rows.mean().reindex(layers)
        std = rows.std().reindex(layers).fillna(0.0)
        ax.bar(
            x + (i - (len(groups) - 1) / 2) * width, mean, width, yerr=std, label=str(g), capsize=2
        )
    ax.set_xticks(x, layers, rotation=30, ha="right")
    ax.set_ylim(0, 1)
    ax.set_ylabel(label)
    ax.legend()


def _by_point(table: pd.DataFrame):
    """One panel per hyperparameter point (seeds pooled)."""
    labels = (
        table.run.map(point_label) if "run" in table else pd.Series("all runs", index=table.index)
    )
    return list(table.groupby(labels, sort=False))


@register_figure("mask_sharing", tables=("sharing",))
def mask_sharing(tables: dict, spec: dict, pdf, png) -> None:
    """Per layer (and in total) the fraction of each mask's weights also kept by another mask
    (mean and std over seeds), one panel per hyperparameter point."""
    table = _layers(tables["table"])
    points = _by_point(table) or [("no masks", table)]
    fig, axes = grid(len(points), width=5.0)
    for ax, (label, rows) in zip(axes, points, strict=True):
        _bars(ax, rows, "mask", "sharing", "shared fraction of the mask")
        ax.set_title(label)
    save(fig, pdf, png)


@register_figure("mask_iou", tables=("overlap",))
def mask_iou(tables: dict, spec: dict, pdf, png) -> None:
    """Per layer (and in total) the IoU of each mask pair (``spec.value: iomin`` for the
    intersection over the smaller mask), one panel per hyperparameter point."""
    value = spec.get("value", "iou")
    table = _layers(tables["table"]).assign(pair=lambda t: t.a + " / " + t.b)
    points = _by_point(table) or [("no masks", table)]
    fig, axes = grid(len(points), width=5.0)
    for ax, (label, rows) in zip(axes, points, strict=True):
        _bars(ax, rows, "pair", value, {"iou": "IoU", "iomin": "intersection / min"}[value])
        ax.set_title(label)
    save(fig, pdf, png)


@register_figure("sharing_vs_size", tables=("sharing",))
def sharing_vs_size(tables: dict, spec: dict, pdf, png) -> None:
    """Total sharing of each mask against the number of maskable weights (runs of a size sweep;
    mean and std over seeds)."""
    plt = pyplot()
    table = tables["table"]
    total = table[table.kind == "total"]
    fig, ax = plt.subplots(figsize=(4.5, 3.4))
    for mask, rows in total.groupby("mask", sort=False):
        stats = rows.groupby("network_size").sharing.agg(["mean", "std"]).reset_index()
        ax.errorbar(
            stats.network_size,
            stats["mean"],
            yerr=stats["std"].fillna(0.0),
            marker="o",
            capsize=3,
            label=str(mask),
        )
    ax.set_xscale("log")
    ax.set_ylim(0, 1)
    ax.set_xlabel("maskable weights")
    ax.set_ylabel("total shared fraction")
    ax.legend()
    save(fig, pdf, png)


@register_figure("confusion_difference", tables=("confusion",))
def confusion_difference(tables: dict, spec: dict, pdf, png) -> None:
    """For each removed class, the change of the row-normalised confusion matrix (masked minus
    reference; rows: true class), titled with the target drop and the largest other drop."""
    table = tables["table"]
    if "run" in table:
        table = table[table.run == table.run.iloc[0]]
    classes = sorted(table.removed.unique())
    n = int(table.true.max()) + 1 if len(table) else 0
    fig, axes = grid(max(len(classes), 1), width=3.0, height=2.8, max_cols=5)
    limit = float(np.nanmax(np.abs(table.delta))) if len(table) else 1.0
    image = None
    for ax, c in zip(axes, classes, strict=False):
        rows = table[table.removed == c]
        delta = np.full((n, n), np.nan)
        delta[rows.true.to_numpy(), rows.predicted.to_numpy()] = rows.delta.to_numpy()
        image = ax.imshow(delta, cmap="RdBu_r", vmin=-limit, vmax=limit)
        ref = rows[(rows.true == c) & (rows.predicted == c)].reference.iloc[0]
        drop = -delta[c, c] / ref * 100 if ref else float("nan")
        ax.set_title(f"without {c}: drop {drop:.0f}%", fontsize=8)
        ax.set_xticks(range(n))
        ax.set_yticks(range(n))
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
    if image is not None:  # one shared colour scale, drawn beside the last panel
        fig.colorbar(image, ax=axes[len(classes) - 1], fraction=0.046, label=r"$\Delta$ confusion")
    save(fig, pdf, png)
