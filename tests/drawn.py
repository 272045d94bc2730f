"""What a figure function drew: its panels, their titles and labels, and how many lines, bars,
boxes, error bars, images and point sets hold finite data, read back from the matplotlib figure
it saved (so a figure test checks the content, not only that a PDF exists)."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Panel:
    """One visible panel (axes and its twins merged; colorbars left out)."""

    title: str
    xlabel: str
    ylabel: str
    lines: int = 0  # Line2D with a finite point (error bars and box-plot parts excluded)
    errorbars: int = 0
    bars: int = 0
    boxes: int = 0  # PathPatch patches: the boxes of a box plot, step histograms
    images: int = 0
    points: int = 0  # scatter collections with a finite point
    legend: list = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (
            self.lines + self.errorbars + self.bars + self.boxes + self.images + self.points
        )

    def text(self) -> str:
        return " ".join([self.title, self.xlabel, self.ylabel, *self.legend])


@contextmanager
def capture():
    """Yield the list of figures saved (``Figure.savefig``) inside the block."""
    from matplotlib.figure import Figure

    saved: list = []
    original = Figure.savefig

    def savefig(self, *args, **kwargs):
        if not any(f is self for f in saved):
            saved.append(self)
        return original(self, *args, **kwargs)

    Figure.savefig = savefig
    try:
        yield saved
    finally:
        Figure.savefig = original


def _finite(values) -> bool:
    try:
        arr = np.asarray(values, dtype=float)
    except (TypeError, ValueError):
        return False
    return bool(np.isfinite(arr).any())


def panels(fig) -> list[Panel]:
    """The figure's visible panels, in order (axes at one position form one panel)."""
    from matplotlib.collections import PathCollection
    from matplotlib.container import BarContainer, ErrorbarContainer
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch

    out: list[Panel] = []
    at: dict = {}
    for ax in fig.axes:
        if not ax.get_visible() or ax.get_label() == "<colorbar>":
            continue
        key = tuple(np.round(ax.get_position().bounds, 6))
        panel = at.get(key)
        if panel is None:
            panel = at[key] = Panel(ax.get_title(), ax.get_xlabel(), ax.get_ylabel())
            out.append(panel)
        else:  # a twin: its labels and artists join the panel
            panel.title = panel.title or ax.get_title()
            panel.ylabel = " | ".join(x for x in (panel.ylabel, ax.get_ylabel()) if x)
        parts = set()
        for c in ax.containers:
            if isinstance(c, ErrorbarContainer):
                data, caps, _ = c.lines
                parts.update(id(x) for x in caps)
                panel.errorbars += int(data is not None and _finite(data.get_ydata()))
                if data is not None:
                    parts.add(id(data))
            elif isinstance(c, BarContainer):
                panel.bars += sum(_finite([p.get_height()]) for p in c.patches)
        panel.boxes += sum(isinstance(p, PathPatch) for p in ax.patches)
        panel.lines += sum(  # box-plot parts and error-bar caps are labelled _nolegend_
            isinstance(x, Line2D)
            and id(x) not in parts
            and x.get_label() != "_nolegend_"
            and _finite(x.get_ydata())
            for x in ax.lines
        )
        panel.images += len(ax.images)
        panel.points += sum(
            isinstance(c, PathCollection) and _finite(np.asarray(c.get_offsets()).ravel())
            for c in ax.collections
        )
        legend = ax.get_legend()
        if legend is not None:
            panel.legend += [t.get_text() for t in legend.get_texts()]
    return out


def check_drawn(fig) -> list[Panel]:
    """The figure's panels, after asserting that each one draws finite data and that no title,
    axis label or legend entry says nan."""
    found = panels(fig)
    assert found, "the figure has no visible panel"
    for p in found:
        assert not p.empty, f"panel {p.title!r} draws nothing finite"
        assert "nan" not in p.text().lower().split(), f"panel {p.title!r} says nan: {p.text()!r}"
    return found
