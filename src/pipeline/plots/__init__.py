"""Figures: one function per figure kind, reading tables only (never models or checkpoints).

Each kind is registered (``@register_figure``) so a figure spec's ``kind`` in the config maps to
one function ``fn(tables: dict[str, DataFrame], spec: dict, out_pdf, out_png)``.
"""

from __future__ import annotations

from pipeline.registry import Registry

register_figure = Registry("figure kind", "register_figure", skip=0)


def draw(kind: str, table_path, summary_path, spec: dict, pdf, png) -> None:
    """Read the cached tables and draw figure ``kind`` into ``pdf`` and ``png``."""
    from pipeline import io

    tables = {"table": io.read_parquet(table_path)}
    for column, value in spec.get("where", {}).items():  # e.g. where: {zoo: cnn}
        table = tables["table"]
        if column not in table.columns:
            raise KeyError(f"figure option where.{column}: {table_path} has no column {column!r}")
        tables["table"] = table[table[column] == value]
        if len(table) and tables["table"].empty:  # a blank figure is never what was asked for
            present = ", ".join(map(repr, sorted(table[column].unique().tolist(), key=str)[:20]))
            raise ValueError(
                f"figure option where.{column}: {value!r} matches no row of {table_path} "
                f"(its {column!r} values: {present})"
            )
    if summary_path:
        tables["summary"] = io.read_parquet(summary_path)
    register_figure.get(kind)(tables, spec, pdf, png)
