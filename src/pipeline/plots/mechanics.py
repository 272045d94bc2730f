"""Conservation-law figures (empirical vs theory over time) and the performance figure."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.plots import register_figure
from pipeline.plots.style import grid, point_label, pyplot, save, suptitle

LABELS = {
    "translation": r"column sums $\langle W_{:,j}, 1\rangle$",
    "scale": r"$|\theta_{\mathrm{in}}|^2$ per layer (BN-normalised)",
    "rescale": r"$|\theta_{\mathrm{in}}|^2 - |\theta_{\mathrm{out}}|^2$ per layer",
    "gradient_norm": r"$|\nabla_{\theta_{\mathrm{in}}} L|^2$ per layer",
}


def time_label(rows: pd.DataFrame) -> str:
    """The x label of one run's panel: the time unit the cache wrote (``time_unit``: the
    continuous theory's lr (1 - dampening) * step under dampened momentum)."""
    units = rows["time_unit"].unique() if "time_unit" in rows else []
    return f"time t = {units[0]}" if len(units) == 1 else r"time $t = \eta \cdot$ step"


def _first_seed(table: pd.DataFrame) -> pd.DataFrame:
    first = table.groupby(table.run.map(point_label)).seed.transform("min")
    return table[table.seed == first]


@register_figure("conservation", tables=())
def conservation(tables: dict, spec: dict, pdf, png) -> None:
    """One column per hyperparameter point. Top: per layer (summed over neurons; translation:
    the first ``max_neurons`` columns) the empirical quantity (solid), the paper's continuous
    prediction (black dashed) and the exact discrete one (white dotted), against the theory's
    time (t = lr * step; lr (1 - dampening) * step under dampened momentum, as labelled).
    Bottom: the relative deviation |empirical - theory| / magnitude of the terms (log scale), so
    symmetry breaking (BatchNorm's eps, float round-off) is visible, never hidden."""
    plt = pyplot()
    table, summary = _first_seed(tables["table"]), tables["summary"]
    metric = spec["metric"]
    runs = list(dict.fromkeys(table.run)) or ["(no runs)"]
    fig, axes = plt.subplots(
        2,
        len(runs),
        figsize=(4.2 * len(runs), 6.4),
        squeeze=False,
        sharex="col",
        gridspec_kw={"height_ratios": [2, 1]},
    )
    for col, run in enumerate(runs):
        ax, dev_ax = axes[0, col], axes[1, col]
        rows = table[table.run == run].copy()
        if metric == "translation":
            rows = rows[rows.neuron < spec.get("max_neurons", 10)]
            keys = ["layer", "neuron"]
        else:
            keys = ["layer"]
        rows["err_d"] = (rows.empirical - rows.theory_discrete).abs()
        rows["err_c"] = (rows.empirical - rows.theory_continuous).abs()
        curves = (
            rows.groupby([*keys, "time"], sort=False)
            .agg(
                empirical=("empirical", "sum"),
                cont=("theory_continuous", "sum"),
                disc=("theory_discrete", "sum"),
                err_d=("err_d", "sum"),
                err_c=("err_c", "sum"),
                mag=("magnitude", "sum"),
            )
            .reset_index()
        )
        colors = iter(plt.colormaps["tab20"](np.linspace(0, 1, 20)))
        for key, curve in curves.groupby(keys, sort=False):
            label = "/".join(map(str, key)) if isinstance(key, tuple) else str(key)
            color = next(colors)
            ax.plot(curve.time, curve.empirical, lw=3, color=color, label=label)
            if curve.cont.notna().any():
                ax.plot(curve.time, curve.cont, "k--", lw=1)
                ax.plot(curve.time, curve.disc, color="white", ls=":", lw=1)
                scale = np.maximum(curve.mag.to_numpy(), np.finfo(float).tiny)
                dev_ax.semilogy(curve.time, np.maximum(curve.err_d / scale, 1e-18), color=color)
                dev_ax.semilogy(
                    curve.time, np.maximum(curve.err_c / scale, 1e-18), color=color, ls="--"
                )
        dev = summary[summary.run == run]
        note = dev.note.iloc[0] if len(dev) and dev.note.iloc[0] else ""
        if note:
            text = note
        elif len(dev):
            text = (
                f"max rel. dev.: discrete {dev.max_rel_dev_discrete.max():.1e}, "
                f"continuous {dev.max_rel_dev_continuous.max():.1e}"
            )
        else:
            text = "no neurons carry this symmetry"
        ax.set_title(f"{point_label(run)}\n{text}", fontsize=8)
        ax.set_ylabel(LABELS.get(metric, metric))
        dev_ax.set_xlabel(time_label(rows))
        dev_ax.set_ylabel("|empirical - theory| / magnitude")
    from matplotlib.lines import Line2D

    handles, labels = axes[0, 0].get_legend_handles_labels()
    handles, labels = handles[:10], labels[:10]
    handles += [Line2D([], [], color="k", ls="--"), Line2D([], [], color="grey", ls=":")]
    labels += ["theory (continuous)", "theory (exact discrete)"]
    axes[0, 0].legend(handles, labels, loc="best")
    axes[1, 0].legend(
        [Line2D([], [], color="grey"), Line2D([], [], color="grey", ls="--")],
        ["exact discrete", "continuous"],
        loc="best",
    )
    suptitle(fig, spec.get("caption", metric), fontsize=10)
    save(fig, pdf, png)


@register_figure("performance", tables=())
def performance(tables: dict, spec: dict, pdf, png) -> None:
    """Per hyperparameter point: train loss (per step, smoothed), val/test loss and accuracy."""
    table = _first_seed(tables["table"])
    runs = list(dict.fromkeys(table.run))
    fig, axes = grid(max(len(runs), 1))
    twins: dict = {}
    for ax, run in zip(axes, runs, strict=True):
        rows = table[table.run == run]
        twin = twins.setdefault(run, ax.twinx())
        for quantity, style in [("train_loss", "-"), ("val_loss", "--"), ("test_loss", ":")]:
            q = rows[rows.quantity == quantity]
            if len(q):
                y = (
                    q.empirical.rolling(max(1, len(q) // 50), min_periods=1).mean()
                    if (quantity == "train_loss")
                    else q.empirical
                )
                ax.plot(q.time, y, "k" + style, label=quantity.replace("_", " "))
        for quantity, style in [("val_accuracy", "--"), ("test_accuracy", ":")]:
            q = rows[rows.quantity == quantity]
            if len(q):
                twin.plot(q.time, q.empirical, "C0" + style, label=quantity.replace("_", " "))
        ax.set_xlabel(time_label(rows))
        ax.set_ylabel("loss")
        twin.set_ylabel("accuracy", color="C0")
        twin.set_ylim(0, 1)
        ax.set_title(point_label(run), fontsize=8)
    if runs:
        h1, l1 = axes[0].get_legend_handles_labels()
        h2, l2 = twins[runs[0]].get_legend_handles_labels()
        axes[0].legend(h1 + h2, l1 + l2, loc="center right")
    suptitle(fig, spec.get("caption", "training performance"), fontsize=11)
    save(fig, pdf, png)
