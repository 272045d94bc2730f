"""Shared matplotlib set-up and saving (PDF for papers, PNG for the report)."""

from __future__ import annotations

from pathlib import Path

from pipeline import io


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(
        {
            "font.size": 10,
            "axes.titlesize": 10,
            "legend.fontsize": 8,
            "figure.dpi": 100,
            "axes.spines.top": False,
            "axes.spines.right": False,
        }
    )
    return plt


def grid(n: int, width: float = 4.0, height: float = 3.2, max_cols: int = 4):
    plt = pyplot()
    cols = min(n, max_cols)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    for ax in axes.ravel()[n:]:
        ax.set_visible(False)
    return fig, axes.ravel()[:n]


def save(fig, pdf: str | Path, png: str | Path) -> None:
    fig.tight_layout()
    for path in (pdf, png):
        with io.atomic_path(path, Path(path).suffix) as tmp:
            fig.savefig(tmp, format=Path(path).suffix[1:], dpi=120)
    pyplot().close(fig)


def suptitle(fig, text: str, **kw) -> None:
    """A figure title wrapped to the figure's width (captions are long)."""
    import textwrap

    width = max(40, int(fig.get_figwidth() * 11))
    fig.suptitle("\n".join(textwrap.wrap(" ".join(str(text).split()), width)), **kw)


def point_label(run: str) -> str:
    """A run name without its seed, as a panel title: ``momentum~0.9, bn_eps~1e-05``."""
    parts = [p for p in run.split("/") if not p.startswith("seed~")]
    return ", ".join(parts) or "all runs"
