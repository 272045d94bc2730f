"""Expand-and-Cluster figures (neuron distances, inferred widths, loss curves, the toy family)
and the lottery-ticket control (loss/accuracy against sparsity per strategy). Tables only."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.plots import register_figure
from pipeline.plots.style import grid, pyplot, save

FLOOR = 1e-17  # distances are plotted on a log axis; exact zeros sit at the floor


def _log(values) -> np.ndarray:
    return np.log10(np.maximum(np.asarray(values, dtype=float), FLOOR))


def _require(table: pd.DataFrame, columns: tuple[str, ...], kind: str) -> None:
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise KeyError(f"figure {kind}: the table lacks columns {missing}")


@register_figure("recovery_distances", tables=("neurons",))
def recovery_distances(tables: dict, spec: dict, pdf, png) -> None:
    """Per layer, histograms of log10 d_w (incoming, 1 - |cos|) and log10 d_a (outgoing) of
    every teacher neuron to its nearest recovered neuron, and of the excess neurons to their
    nearest teacher neuron; the recovery tolerance as a dashed line. Neuron table: layer, kind
    (teacher | excess), d_w, d_a."""
    table = tables["table"]
    _require(table, ("layer", "kind", "d_w", "d_a"), "recovery_distances")
    tol = spec.get("tolerance", 1e-3)
    layers = list(dict.fromkeys(table.layer)) or ["(none)"]
    fig, axes = grid(2 * len(layers), max_cols=2)
    for i, layer in enumerate(layers):
        rows = table[table.layer == layer]
        for ax, col, label in (
            (axes[2 * i], "d_w", r"$\log_{10} d_w$ (incoming)"),
            (axes[2 * i + 1], "d_a", r"$\log_{10} d_a$ (outgoing)"),
        ):
            values = [_log(rows[rows.kind == k][col]) for k in ("teacher", "excess")]
            bins = np.linspace(np.log10(FLOOR), 0.5, 36)
            ax.hist(
                values,
                bins=bins,
                stacked=True,
                color=["tab:blue", "tab:red"],
                label=["teacher neurons", "excess neurons"],
            )
            if col == "d_w":
                ax.axvline(np.log10(tol), color="k", ls="--", lw=1, label=f"tolerance {tol:g}")
            ax.set_xlabel(label)
            ax.set_ylabel("neurons")
            ax.set_title(str(layer))
        axes[2 * i].legend()
    save(fig, pdf, png)


@register_figure("recovery_widths", tables=("recovery",))
def recovery_widths(tables: dict, spec: dict, pdf, png) -> None:
    """Inferred against true width, one point per (problem, layer), green where the whole
    teacher was recovered, red where not; the diagonal is exact width recovery. Recovery
    table: teacher_width, inferred_width, recovered."""
    table = tables["table"]
    _require(table, ("teacher_width", "inferred_width", "recovered"), "recovery_widths")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    rng = np.random.default_rng(0)
    jitter = rng.uniform(-0.12, 0.12, size=(2, len(table)))
    for ok, color, label in ((True, "tab:green", "recovered"), (False, "tab:red", "not recovered")):
        sel = (table.recovered == ok).to_numpy()
        ax.scatter(
            table.teacher_width[sel] + jitter[0, sel],
            table.inferred_width[sel] + jitter[1, sel],
            s=18,
            color=color,
            label=label,
        )
    top = max(int(table.teacher_width.max()), int(table.inferred_width.max()), 1) + 1
    ax.plot([0, top], [0, top], "k--", lw=1)
    ax.set_xlabel("teacher width")
    ax.set_ylabel("inferred width")
    rate = float(table.groupby(_problem_key(table)).recovered.all().mean()) if len(table) else 0
    ax.set_title(f"recovered: {rate:.0%} of {_count(table)} problems")
    ax.legend()
    save(fig, pdf, png)


def _problem_key(table: pd.DataFrame):
    return table.problem if "problem" in table.columns else np.zeros(len(table))


def _count(table: pd.DataFrame) -> int:
    return int(pd.Series(_problem_key(table)).nunique())


@register_figure("recovery_losses", tables=("students_history", "finetune_history"))
def recovery_losses(tables: dict, spec: dict, pdf, png) -> None:
    """Training loss (solid) and held-out probe loss (dashed) of every student against epochs,
    log scale; one panel per ``stage`` (students, finetuning, final) when the table has one.
    History table: epoch, student, loss, test_loss (, stage)."""
    table = tables["table"]
    _require(table, ("epoch", "student", "loss", "test_loss"), "recovery_losses")
    stages = list(dict.fromkeys(table.stage)) if "stage" in table.columns else [None]
    fig, axes = grid(len(stages), max_cols=3)
    for ax, stage in zip(axes, stages, strict=True):
        rows = table if stage is None else table[table.stage == stage]
        colors = pyplot().colormaps["tab10"]
        for s, curve in rows.groupby("student"):
            c = colors(int(s) % 10)
            ax.semilogy(curve.epoch, np.maximum(curve.loss, FLOOR), color=c, lw=1)
            ax.semilogy(curve.epoch, np.maximum(curve.test_loss, FLOOR), color=c, lw=1, ls="--")
        ax.set_xlabel("epoch")
        ax.set_ylabel("MSE (solid: probe set, dashed: held out)")
        ax.set_title(stage or "students")
    save(fig, pdf, png)


@register_figure("recovery_family", tables=("recovery",))
def recovery_family(tables: dict, spec: dict, pdf, png) -> None:
    """A family of toy problems: per problem the largest teacher-neuron distance ``max d_w``
    (log scale; green recovered, red not) and the width error; the title gives the recovery
    rate. Recovery table: problem, max_d_w, teacher_width, inferred_width, recovered (one row
    per problem and layer; a problem's worst layer is shown)."""
    table = tables["table"]
    _require(
        table,
        ("problem", "max_d_w", "teacher_width", "inferred_width", "recovered"),
        "recovery_family",
    )
    tol = spec.get("tolerance", 1e-3)
    worst = (
        table.assign(width_error=table.inferred_width - table.teacher_width)
        .groupby("problem", sort=False)
        .agg(
            max_d_w=("max_d_w", "max"),
            recovered=("recovered", "all"),
            width_error=("width_error", lambda e: e.abs().max()),
        )
    )
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(9.0, 3.6))
    x = np.arange(len(worst))
    colors = np.where(worst.recovered, "tab:green", "tab:red")
    ax.scatter(x, _log(worst.max_d_w), c=colors, s=20)
    ax.axhline(np.log10(tol), color="k", ls="--", lw=1)
    ax.set_xticks(x, worst.index, rotation=90, fontsize=6)
    ax.set_ylabel(r"$\log_{10} \max_j d_w$")
    bx.bar(x, worst.width_error, color=colors)
    bx.set_xticks(x, worst.index, rotation=90, fontsize=6)
    bx.set_ylabel("|inferred - teacher width|")
    ax.set_title(f"recovery rate {worst.recovered.mean():.0%} ({len(worst)} problems)")
    save(fig, pdf, png)


@register_figure("lottery", tables=("lottery",))
def lottery(tables: dict, spec: dict, pdf, png) -> None:
    """Lottery tickets: ``spec.metrics`` (default test accuracy and test loss) against the
    fraction of weights remaining (log scale, dense on the left), one line per strategy (mean
    and range over ``student`` or ``seed`` when present). Level table: strategy, sparsity and
    the metric columns."""
    table = tables["table"]
    metrics = spec.get("metrics", ["test_accuracy", "test_loss"])
    _require(table, ("strategy", "sparsity", *metrics), "lottery")
    fig, axes = grid(len(metrics), max_cols=2)
    for ax, metric in zip(axes, metrics, strict=True):
        for strategy, rows in table.groupby("strategy", sort=False):
            agg = rows.groupby("sparsity")[metric].agg(["mean", "min", "max"]).reset_index()
            remaining = 1 - agg.sparsity
            (line,) = ax.plot(remaining, agg["mean"], marker="o", ms=3, label=strategy)
            ax.fill_between(remaining, agg["min"], agg["max"], color=line.get_color(), alpha=0.2)
        ax.set_xscale("log")
        ax.invert_xaxis()
        if metric.endswith("loss"):
            ax.set_yscale("log")
        ax.set_xlabel("fraction of weights remaining")
        ax.set_ylabel(metric.replace("_", " "))
        ax.legend()
    save(fig, pdf, png)
