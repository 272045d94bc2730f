"""Figures of the neural-teleportation study (Armenta et al.), each from one table.

- ``teleport_validation`` (Fig. 6/8/9/10): per dataset-model, box plots of validation accuracy at
  chosen epochs, one box per method (Standard / Teleported SGD, with and without momentum), each
  pooling learning rates x seeds; diverged runs are drawn as red crosses below the boxes and
  counted; under it the mean +- std curves over epochs. Table:
  :data:`pipeline.teleport.validation.COLUMNS`.
- ``micro_teleport`` (Fig. 4): histograms of the angles between gradient, micro-teleport
  displacement and random vectors (columns: pair, angle; optional model / batch_size).
- ``teleport_interpolation`` (Fig. 5): loss and accuracy along the interpolation path, before
  and after teleporting (columns: alpha, split, loss, accuracy, teleported).
- ``teleport_statistics`` (Fig. 7): mean +- std of the change of |grad|/|theta| against the CoB
  range (columns: cob_range, ratio_change; optional model).
- ``weight_histograms`` (Fig. 11): weight densities at init, teleported and same-distribution
  (columns: kind, layer, left, right, density).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.plots import register_figure
from pipeline.plots.style import grid, pyplot, save, suptitle

METHODS = (
    "Standard SGD",
    "Teleported SGD",
    "Standard SGD with momentum",
    "Teleported SGD with momentum",
)
COLORS = {m: f"C{i}" for i, m in enumerate(METHODS)}


def _need(table: pd.DataFrame, columns, figure: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise KeyError(f"figure {figure!r}: its table lacks columns {missing}")


def _methods(table: pd.DataFrame) -> list[str]:
    present = list(dict.fromkeys(table.method))
    return [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]


def _color(method: str, methods: list[str]) -> str:
    return COLORS.get(method, f"C{4 + methods.index(method)}")


@register_figure("teleport_validation", tables=("validation",))
def teleport_validation(tables: dict, spec: dict, pdf, png) -> None:
    """Spec: ``box_epochs`` (default: 30%, 60% and 95% of the last epoch), ``metric``
    (accuracy or loss), ``caption``."""
    table = tables["table"]
    metric = spec.get("metric", "accuracy")
    _need(table, ("dataset", "model", "method", "epoch", metric, "diverged"), "teleport_validation")
    plt = pyplot()
    panels = list(dict.fromkeys(zip(table.dataset, table.model, strict=True))) or [("-", "-")]
    last = int(table.epoch.max()) if len(table) else 1
    epochs = spec.get("box_epochs") or sorted({max(1, round(last * f)) for f in (0.3, 0.6, 0.95)})
    methods = _methods(table)
    fig, axes = plt.subplots(2, len(panels), figsize=(4.6 * len(panels) + 2.2, 7.0), squeeze=False)
    width = 0.8 / max(len(methods), 1)
    label = f"validation {metric}"
    for col, (dataset, model) in enumerate(panels):
        rows = table[(table.dataset == dataset) & (table.model == model)]
        box_ax, curve_ax = axes[0, col], axes[1, col]
        floor = 0.0 if metric == "accuracy" else float(np.nanmin(rows[metric])) if len(rows) else 0
        for m, method in enumerate(methods):
            color = _color(method, methods)
            sel = rows[rows.method == method]
            for e, epoch in enumerate(epochs):
                at = sel[sel.epoch == epoch]
                values = at[metric].dropna().to_numpy()
                x = e + (m - (len(methods) - 1) / 2) * width
                if len(values):
                    box = box_ax.boxplot(
                        [values],
                        positions=[x],
                        widths=width * 0.9,
                        patch_artist=True,
                        manage_ticks=False,
                    )
                    for patch in box["boxes"]:
                        patch.set(facecolor=color, alpha=0.6)
                    for line in box["medians"]:
                        line.set(color="k")
                n_div = int(at.diverged.sum())
                if n_div:
                    box_ax.plot([x] * n_div, [floor] * n_div, "x", color="red", ms=6)
                    box_ax.annotate(
                        f"{n_div}",
                        (x, floor),
                        textcoords="offset points",
                        xytext=(0, 6),
                        ha="center",
                        fontsize=7,
                        color="red",
                    )
            curve = sel.groupby("epoch")[metric].agg(["mean", "std"]).reset_index()
            n_div = sel.loc[sel.diverged].run.nunique() if "run" in sel else 0
            suffix = f" ({n_div} diverged)" if n_div else ""
            curve_ax.plot(curve.epoch, curve["mean"], color=color, label=f"{method}{suffix}")
            curve_ax.fill_between(
                curve.epoch,
                curve["mean"] - curve["std"].fillna(0),
                curve["mean"] + curve["std"].fillna(0),
                color=color,
                alpha=0.2,
            )
        box_ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
        box_ax.set_xlabel("epoch")
        box_ax.set_ylabel(label)
        box_ax.set_title(f"{dataset} / {model}")
        curve_ax.set_xlabel("epoch")
        curve_ax.set_ylabel(f"{label} (mean $\\pm$ std)")
        curve_ax.legend(loc="lower right" if metric == "accuracy" else "upper right")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(facecolor=_color(m, methods), alpha=0.6, label=m) for m in methods]
    handles.append(Line2D([], [], ls="", marker="x", color="red", label="diverged run (count)"))
    axes[0, -1].legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=7)
    suptitle(fig, spec.get("caption", "SGD vs teleported SGD (boxes: learning rates x seeds)"))
    save(fig, pdf, png)


@register_figure("micro_teleport", tables=("micro",))
def micro_teleport(tables: dict, spec: dict, pdf, png) -> None:
    """Spec: ``half_width`` of the angle window around 90 degrees (default 0.25), ``bins``."""
    table = tables["table"]
    _need(table, ("pair", "angle"), "micro_teleport")
    keys = [c for c in ("model", "batch_size", "data") if c in table.columns]
    panels = list(table.groupby(keys, sort=False)) if keys else [((), table)]
    half = float(spec.get("half_width", 0.25))
    pairs = list(dict.fromkeys(table.pair))
    plt = pyplot()
    fig, axes = plt.subplots(
        len(pairs),
        len(panels),
        figsize=(4.0 * len(panels), 1.6 * len(pairs) + 0.8),
        squeeze=False,
        sharex=True,
    )
    edges = np.linspace(90 - half, 90 + half, int(spec.get("bins", 50)) + 1)
    for col, (key, rows) in enumerate(panels):
        for r, pair in enumerate(pairs):
            ax = axes[r, col]
            angles = rows[rows.pair == pair].angle.to_numpy()
            counts, _ = np.histogram(angles, edges)
            ax.stairs(counts / max(counts.max(), 1), edges, fill=True, color=f"C{r}", alpha=0.7)
            outside = int(((angles < edges[0]) | (angles > edges[-1])).sum())
            ax.set_title(f"{pair.replace('_', ' ')}: {outside}/{len(angles)} outside", fontsize=8)
            ax.axvline(90, color="k", lw=0.5)
            ax.set_ylabel("count / max")
        axes[-1, col].set_xlabel("angle (degrees)")
        if keys:
            name = ", ".join(f"{k}={v}" for k, v in zip(keys, key, strict=True))
            axes[0, col].annotate(name, (0.5, 1.35), xycoords="axes fraction", ha="center")
    suptitle(fig, spec.get("caption", "micro-teleportation vs gradient"))
    save(fig, pdf, png)


@register_figure("teleport_interpolation", tables=("interpolation",))
def teleport_interpolation(tables: dict, spec: dict, pdf, png) -> None:
    """Loss (left) and accuracy (right) against alpha; solid: A to B, dashed: teleported."""
    table = tables["table"]
    _need(table, ("alpha", "split", "loss", "accuracy", "teleported"), "teleport_interpolation")
    plt = pyplot()
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    splits = list(dict.fromkeys(table.split))
    for (teleported, split), rows in table.groupby(["teleported", "split"], sort=False):
        rows = rows.sort_values("alpha")
        style = "--" if teleported else "-"
        color = f"C{splits.index(split)}"
        name = f"{split}, {'T(A) to T(B)' if teleported else 'A to B'}"
        loss_ax.plot(rows.alpha, rows.loss, style, color=color, label=name)
        acc_ax.plot(rows.alpha, rows.accuracy, style, color=color, label=name)
    for ax, what in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.set_xlabel(r"$\alpha$ ($\theta = (1-\alpha)\,\theta_A + \alpha\,\theta_B$)")
        ax.set_ylabel(what)
        for x in (0, 1):
            ax.axvline(x, color="grey", lw=0.5)
    loss_ax.set_yscale("log")
    acc_ax.legend(fontsize=7)
    suptitle(fig, spec.get("caption", "1D interpolation before and after teleportation"))
    save(fig, pdf, png)


@register_figure("teleport_statistics", tables=("statistics",))
def teleport_statistics(tables: dict, spec: dict, pdf, png) -> None:
    """Mean +- std of | |grad|/|theta| - |grad'|/|theta'| | against the CoB range (spec ``log``:
    logarithmic y axis)."""
    table = tables["table"]
    _need(table, ("cob_range", "ratio_change"), "teleport_statistics")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.0, 3.6))
    groups = table.groupby("model") if "model" in table.columns else [("network", table)]
    for name, rows in groups:
        stats = rows.groupby("cob_range").ratio_change.agg(["mean", "std"]).reset_index()
        ax.errorbar(
            stats.cob_range,
            stats["mean"],
            yerr=stats["std"].fillna(0),
            marker="o",
            ms=3,
            capsize=2,
            label=str(name),
        )
    ax.set_xlabel("CoB range")
    ax.set_ylabel(r"$|\,\|\nabla L\|/\|\theta\| - \|\nabla L'\|/\|\theta'\|\,|$")
    if spec.get("log", False):
        ax.set_yscale("log")
    ax.legend()
    ax.set_title(spec.get("caption", "gradient / weight norm change after teleportation"))
    save(fig, pdf, png)


@register_figure("weight_histograms", tables=("histograms",))
def weight_histograms(tables: dict, spec: dict, pdf, png) -> None:
    """Spec: ``layers`` (default ["all"]), ``xlim`` (default [-0.25, 0.25]), ``insets`` (up to
    two [lo, hi] windows drawn zoomed in; default the paper's tails [-0.13, -0.12] and
    [0.12, 0.13])."""
    table = tables["table"]
    _need(table, ("kind", "layer", "left", "right", "density"), "weight_histograms")
    layers = spec.get("layers", ["all"])
    xlim = spec.get("xlim", [-0.25, 0.25])
    insets = spec.get("insets", [[-0.13, -0.12], [0.12, 0.13]])
    fig, axes = grid(len(layers), width=5.0, height=3.8, max_cols=3)
    for ax, layer in zip(axes, layers, strict=True):
        rows = table[table.layer == layer]
        if not len(rows):
            raise KeyError(
                f"figure 'weight_histograms': no layer {layer!r} in the table; "
                f"layers: {sorted(set(table.layer))}"
            )
        curves = {kind: r for kind, r in rows.groupby("kind", sort=False)}
        for i, (kind, r) in enumerate(curves.items()):
            edges = np.append(r.left.to_numpy(), r.right.to_numpy()[-1])
            ax.stairs(r.density.to_numpy(), edges, color=f"C{i}", label=kind.replace("_", " "))
        ax.set_xlim(*xlim)
        ax.set_xlabel("weight value")
        ax.set_ylabel("density")
        ax.set_title(f"weights: {layer}")
        ax.legend(fontsize=7, loc="upper center")
        for k, (lo, hi) in enumerate(insets[:2]):
            inset = ax.inset_axes([0.03 + 0.69 * k, 0.58, 0.26, 0.3])
            top = 0.0
            for i, (_, r) in enumerate(curves.items()):
                edges = np.append(r.left.to_numpy(), r.right.to_numpy()[-1])
                inset.stairs(r.density.to_numpy(), edges, color=f"C{i}")
                inside = r[(r.right > lo) & (r.left < hi)].density
                top = max(top, float(inside.max()) if len(inside) else 0.0)
            inset.set_xlim(lo, hi)
            inset.set_ylim(0, top * 1.1 if top > 0 else 1)
            inset.tick_params(labelsize=6)
    suptitle(fig, spec.get("caption", "weight distributions: init, teleported, same distribution"))
    save(fig, pdf, png)
