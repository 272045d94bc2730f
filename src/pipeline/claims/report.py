"""The claims table in words: the lines ``make default`` ends with, and the report's page."""

from __future__ import annotations

import html

import pandas as pd

SHOWN = ["study", "claim", "value", "direction", "threshold", "margin", "holds", "item", "figure"]


def claim_rows(table: pd.DataFrame) -> pd.DataFrame:
    """One row per (study, claim): the ``claim`` scope, in table order."""
    if table.empty:
        return table
    return table[table.scope == "claim"].reset_index(drop=True)


def _number(x: float) -> str:
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def summary_lines(table: pd.DataFrame) -> list[str]:
    """The claims table (one line per claim), then ``N of M claims hold`` and each claim that
    does not, with its worst check."""
    claims = claim_rows(table)
    if claims.empty:
        return ["0 of 0 claims hold (no study has a claim)"]
    width = max(len(f"{r.study}.{r.claim}") for r in claims.itertuples())
    lines = [f"{'claim':<{width}}  {'value':>10} {'':2} {'threshold':>10} {'margin':>10}  holds"]
    for r in claims.itertuples():
        name = f"{r.study}.{r.claim}"
        lines.append(
            f"{name:<{width}}  {_number(r.value):>10} {r.direction:2} {_number(r.threshold):>10} "
            f"{_number(r.margin):>10}  {'yes' if r.holds else 'NO'}"
        )
    held = int(claims.holds.sum())
    lines.append(f"{held} of {len(claims)} claims hold")
    for r in claims[~claims.holds].itertuples():
        lines.append(
            f"  does not hold: {r.study}.{r.claim}: {r.statement} "
            f"[{r.failed} of {r.checks} checks fail; worst: {r.item}: {_number(r.value)} "
            f"{r.direction} {_number(r.threshold)}]"
        )
    return lines


def _html_table(frame: pd.DataFrame, columns: list[str]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for r in frame.itertuples():
        cls = "holds" if r.holds else "fails"
        text = [
            ("yes" if r.holds else "NO") if c == "holds" else _number(getattr(r, c))
            for c in columns
        ]
        cells = "".join(f"<td>{html.escape(t)}</td>" for t in text)
        body.append(f'<tr class="{cls}">{cells}</tr>')
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


STYLE = """
body { font-family: sans-serif; font-size: 13px; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #ccc; padding: 2px 6px; text-align: left; }
tr.fails td { background: #fde0dc; }
tr.holds td { background: #e6f4ea; }
"""


def render_html(table: pd.DataFrame) -> str:
    """A standalone page: the per-claim table, then every check per run."""
    claims = claim_rows(table)
    held = int(claims.holds.sum()) if len(claims) else 0
    parts = [
        f"<html><head><meta charset='utf-8'><style>{STYLE}</style></head><body>",
        f"<h2>{held} of {len(claims)} claims hold</h2>",
        "<p>Each claim is a paper's statement checked on this run's tables. value and threshold "
        "are the worst check's (the run, layer or model named in <em>item</em>); margin is how far "
        "inside the threshold it lies (negative: the claim does not hold). Penalties and "
        "accuracies are fractions (0.01 = 1 point).</p>",
    ]
    if len(claims):
        parts.append(_html_table(claims, SHOWN + ["checks", "failed"]))
        parts.append("<h3>Statements</h3><ul>")
        for r in claims.drop_duplicates("claim").itertuples():
            parts.append(
                f"<li><b>{html.escape(r.claim)}</b>: {html.escape(r.statement)} "
                f"<small>(tables: {html.escape(r.tables)})</small></li>"
            )
        parts.append("</ul><h3>Every check</h3>")
        checks = table[table.scope == "check"]
        parts.append(_html_table(checks, ["study", "claim", "run", *SHOWN[2:8]]))
    parts.append("</body></html>")
    return "\n".join(parts)


def write_html(table: pd.DataFrame, out) -> None:
    from pipeline import io

    with io.atomic_path(out, ".html") as tmp:
        tmp.write_text(render_html(table))
