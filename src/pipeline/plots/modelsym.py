"""Figures of the modelsym study (Godfrey et al. 2022): stitching, alignment, rotation control.

Each reads one table (``tables["table"]``) and aggregates over model pairs (mean +- std):

- ``stitching_penalty``: stitching penalty vs layer, one line per stitching type (the
  ``stitching`` tables of all pairs, concatenated);
- ``similarity_matrix``: per similarity metric, the matrix of mean similarity over all layer
  pairs (the ``alignment`` tables of the CKA metrics, with a ``metric`` column);
- ``procrustes_layers``: Procrustes similarity (1 - d) per layer, G_ReLU vs orthogonal;
- ``rotation_penalty``: rotation penalty per layer, per inserted group;
- ``lasso_sparsity``: LASSO stitching sparsity vs penalty (one point per lambda), with the
  G_ReLU layer (sparsity 1 - 1/n) and the full 1x1 map for reference;
- ``weight_matching_barrier``: loss along the linear path between two members, before and
  after weight matching.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from pipeline.plots import register_figure
from pipeline.plots.style import grid, pyplot, save


def _need(table: pd.DataFrame, columns, figure: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise KeyError(f"figure {figure!r}: its table lacks columns {missing}")


def _layer_axis(ax, frame: pd.DataFrame, position="position", label="label") -> None:
    ticks = frame[[position, label]].drop_duplicates().sort_values(position)
    ax.set_xticks(
        ticks[position].to_numpy(),
        ticks[label].astype(str).to_numpy(),
        rotation=45 if len(ticks) > 8 else 0,
    )
    ax.set_xlabel("layer (module index; * inside a residual block)")


def _mean_std(frame: pd.DataFrame, keys, value) -> pd.DataFrame:
    out = frame.groupby(keys, sort=True)[value].agg(["mean", "std", "count"]).reset_index()
    out["std"] = out["std"].fillna(0.0)
    return out


@register_figure("stitching_penalty", tables=("stitching",))
def stitching_penalty(tables: dict, spec: dict, pdf, png) -> None:
    """Stitching penalty (percentage points) vs layer, mean +- std over pairs, per type;
    ``spec.types``: which stitching labels to draw, in order (default: all)."""
    table = tables["table"]
    _need(table, ["stitch", "position", "label", "penalty"], "stitching_penalty")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    stats = _mean_std(table, ["stitch", "position", "label"], "penalty")
    for stitch in spec.get("types") or list(dict.fromkeys(table.stitch)):
        rows = stats[stats.stitch == stitch]
        ax.errorbar(
            rows.position,
            100 * rows["mean"],
            yerr=100 * rows["std"],
            marker="o",
            capsize=3,
            label=f"{stitch} (n={int(rows['count'].max()) if len(rows) else 0})",
        )
    _layer_axis(ax, table)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_ylabel("stitching penalty (points)")
    ax.legend(loc="best")
    ax.set_title(spec.get("title", "stitching penalty per layer"))
    save(fig, pdf, png)


@register_figure("similarity_matrix", tables=("alignment",))
def similarity_matrix(tables: dict, spec: dict, pdf, png) -> None:
    """Per metric, mean similarity over pairs for every (layer of a, layer of b)."""
    table = tables["table"]
    _need(
        table,
        ["metric", "position_a", "position_b", "label_a", "label_b", "similarity"],
        "similarity_matrix",
    )
    metrics = spec.get("metrics") or list(dict.fromkeys(table.metric))
    fig, axes = grid(len(metrics), 4.2, 3.8)
    for ax, metric in zip(axes, metrics, strict=True):
        rows = table[table.metric == metric]
        mean = rows.pivot_table(
            index="position_a", columns="position_b", values="similarity", aggfunc="mean"
        )
        image = ax.imshow(mean.to_numpy(), vmin=0, vmax=1, cmap="viridis", origin="lower")
        labels_a = rows.drop_duplicates("position_a").set_index("position_a").label_a
        labels_b = rows.drop_duplicates("position_b").set_index("position_b").label_b
        ax.set_yticks(range(len(mean.index)), labels_a.reindex(mean.index).astype(str))
        ax.set_xticks(
            range(len(mean.columns)),
            labels_b.reindex(mean.columns).astype(str),
            rotation=45 if len(mean.columns) > 8 else 0,
        )
        for (i, j), v in np.ndenumerate(mean.to_numpy()):
            if mean.shape[0] <= 8:
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7, color="w")
        ax.set_xlabel("layer of model b")
        ax.set_ylabel("layer of model a")
        pairs = rows.groupby(["a", "b"]).ngroups if "a" in rows else "?"
        ax.set_title(f"{metric} (pairs: {pairs})")
        fig.colorbar(image, ax=ax, fraction=0.046)
    save(fig, pdf, png)


@register_figure("procrustes_layers", tables=("alignment",))
def procrustes_layers(tables: dict, spec: dict, pdf, png) -> None:
    """Procrustes similarity 1 - d per layer (diagonal pairs), G_ReLU vs orthogonal."""
    table = tables["table"]
    _need(table, ["metric", "position_a", "label_a", "similarity"], "procrustes_layers")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    for metric in spec.get("metrics") or ["grelu_procrustes", "ortho_procrustes"]:
        rows = table[table.metric == metric]
        stats = _mean_std(rows, ["position_a", "label_a"], "similarity")
        ax.errorbar(
            stats.position_a, stats["mean"], yerr=stats["std"], marker="o", capsize=3, label=metric
        )
    _layer_axis(ax, table, "position_a", "label_a")
    ax.set_ylabel("similarity 1 - d")
    ax.legend(loc="best")
    ax.set_title(spec.get("title", "Procrustes similarity: G_ReLU vs orthogonal"))
    save(fig, pdf, png)


@register_figure("rotation_penalty", tables=("rotation",))
def rotation_penalty(tables: dict, spec: dict, pdf, png) -> None:
    """Rotation penalty (points) per layer for each inserted group, mean +- std over repeats."""
    table = tables["table"]
    _need(table, ["layer", "position", "group", "penalty"], "rotation_penalty")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    groups = list(dict.fromkeys(table.group))
    width = 0.8 / max(len(groups), 1)
    for k, group in enumerate(groups):
        stats = _mean_std(table[table.group == group], ["position", "layer"], "penalty")
        ax.bar(
            stats.position + (k - (len(groups) - 1) / 2) * width,
            100 * stats["mean"],
            width,
            yerr=100 * stats["std"],
            capsize=3,
            label=group,
        )
    ticks = table[["position", "layer"]].drop_duplicates().sort_values("position")
    ax.set_xticks(ticks.position.to_numpy(), ticks.layer.to_numpy())
    ax.set_xlabel("layer after which T is inserted")
    ax.set_ylabel("rotation penalty (points)")
    ax.axhline(0, color="grey", lw=0.5)
    ax.legend(loc="best")
    ax.set_title(spec.get("title", "rotation/projection control"))
    save(fig, pdf, png)


@register_figure("lasso_sparsity", tables=("stitching",))
def lasso_sparsity(tables: dict, spec: dict, pdf, png) -> None:
    """Sparsity vs penalty of the LASSO stitching layers (one point per lambda and layer), and
    the G_ReLU (``birkhoff``/``permutation``) and full (``linear``) layers for reference."""
    table = tables["table"]
    _need(table, ["stitch", "type", "options", "label", "penalty"], "lasso_sparsity")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    layers = spec.get("layers") or list(dict.fromkeys(table.label))
    markers = iter(["o", "s", "^", "D", "v", "P", "X", "*"] * 8)
    for layer in layers:
        rows = table[table.label == layer].copy()
        marker = next(markers)
        lasso = rows[rows.type == "lasso"].copy()
        if len(lasso):
            lasso["lam"] = [json.loads(o).get("lam") for o in lasso.options]
            stats = (
                lasso.groupby("lam")
                .agg(sparsity=("sparsity", "mean"), penalty=("penalty", "mean"))
                .reset_index()
            )
            ax.plot(stats.sparsity, 100 * stats.penalty, marker=marker, label=f"LASSO, {layer}")
            for r in stats.itertuples():
                ax.annotate(f"{r.lam:g}", (r.sparsity, 100 * r.penalty), fontsize=7)
        for kind, color in (("birkhoff", "C3"), ("permutation", "C4"), ("linear", "C2")):
            ref = rows[rows.type == kind]
            if len(ref):
                sparsity = ref.sparsity.mean() if kind != "linear" else 0.0
                ax.scatter(
                    [sparsity],
                    [100 * ref.penalty.mean()],
                    color=color,
                    marker=marker,
                    label=f"{kind}, {layer}",
                )
    ax.set_xlabel("sparsity (fraction of |W_ij| <= 1e-3)")
    ax.set_ylabel("stitching penalty (points)")
    ax.legend(loc="best", fontsize=7)
    ax.set_title(spec.get("title", "LASSO stitching: sparsity vs penalty"))
    save(fig, pdf, png)


@register_figure("weight_matching_barrier", tables=("alignment",))
def weight_matching_barrier(tables: dict, spec: dict, pdf, png) -> None:
    """Loss along the linear path between members, before (dashed) and after (solid) weight
    matching, mean over pairs, per split; the title gives the mean barriers. Reads the
    ``weight_matching`` rows of an alignment table (the other metrics' rows have no path)."""
    table = tables["table"]
    _need(table, ["aligned", "t", "split", "loss", "loss_barrier"], "weight_matching_barrier")
    if "metric" in table.columns:
        table = table[table.metric == "weight_matching"]
    table = table[table.split.notna()]
    if table.empty:
        raise ValueError(
            "figure 'weight_matching_barrier': its table has no weight_matching rows (add "
            "weight_matching to the study's alignment metrics)"
        )
    splits = list(dict.fromkeys(table.split))
    fig, axes = grid(len(splits), 4.2, 3.4)
    for ax, split in zip(axes, splits, strict=True):
        rows = table[table.split == split]
        text = []
        for aligned, style in ((False, "--"), (True, "-")):
            part = rows[rows.aligned == aligned]
            curve = part.groupby("t").loss.mean()
            ax.plot(
                curve.index,
                curve.to_numpy(),
                style,
                label="weight matched" if aligned else "as trained",
            )
            text.append(f"{'after' if aligned else 'before'} {part.loss_barrier.mean():.3f}")
        ax.set_xlabel("t (0: model a, 1: model b)")
        ax.set_ylabel(f"{split} loss")
        ax.set_title(f"{split}: barrier " + ", ".join(text), fontsize=8)
        ax.legend(loc="best")
    save(fig, pdf, png)
