"""Evaluating a study's claims: checks, margins, and aggregation per run and per claim.

A claim function returns rows ``(run, seed, item, value, threshold, direction[, note,
figure])``. Here each row gets its margin,

    margin = threshold - value   (direction < or <=),   value - threshold   (> or >=),

so a positive margin is room to spare; ``holds`` is the comparison itself (a NaN value never
holds). Three scopes of rows go into ``results/<study>/claims.parquet``:

- ``check``: every row the claim returned;
- ``run``: per run (seed, or model pair), the check with the smallest margin;
- ``claim``: per claim, the run with the smallest margin; it holds when every check holds.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import io
from pipeline.claims import register_claim
from pipeline.claims.report import write_html

COLUMNS = [
    "study",
    "claim",
    "scope",
    "run",
    "seed",
    "item",
    "value",
    "direction",
    "threshold",
    "margin",
    "holds",
    "checks",
    "failed",
    "figure",
    "tables",
    "statement",
    "note",
]
SCOPES = ("check", "run", "claim")
COMPARE = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}


class Tables:
    """A study's tables by key (path under ``results/<study>/`` without ``.parquet``), read on
    first use; remembers which were read."""

    def __init__(self, paths: dict[str, str | Path]):
        self.paths = {k: Path(v) for k, v in paths.items()}
        self._frames: dict[str, pd.DataFrame] = {}
        self.read: list[str] = []

    def __contains__(self, key: str) -> bool:
        return key in self.paths

    def __getitem__(self, key: str) -> pd.DataFrame:
        if key not in self.paths:
            raise KeyError(f"no table {key!r}; tables: {', '.join(sorted(self.paths))}")
        if key not in self._frames:
            self._frames[key] = io.read_parquet(self.paths[key])
            self.read.append(key)
        return self._frames[key]

    def keys(self) -> list[str]:
        return sorted(self.paths)


@dataclass
class Context:
    """What a claim may know besides its tables: the study's config block and its runs
    (``run name -> {"seed": int, "model": {...}, "train": {...}}``, from the config)."""

    study: str
    spec: dict
    runs: dict[str, dict] = field(default_factory=dict)

    def figures(self, kind: str, **match) -> list[str]:
        """Names of the study's figures of ``kind`` whose spec has every ``key: value`` of
        ``match``."""
        return [
            name
            for name, fig in self.spec.get("figures", {}).items()
            if fig.get("kind") == kind and all(fig.get(k) == v for k, v in match.items())
        ]

    def shown(self, table: pd.DataFrame, kind: str) -> pd.DataFrame:
        """The rows of ``table`` that the study's figures of ``kind`` show (their ``where``
        filters, e.g. one zoo); every row where no such figure exists or one shows all."""
        wheres = [
            fig.get("where", {})
            for fig in self.spec.get("figures", {}).values()
            if fig.get("kind") == kind
        ]
        if not wheres or not all(wheres):
            return table
        keep = np.zeros(len(table), dtype=bool)
        for where in wheres:
            match = np.ones(len(table), dtype=bool)
            for column, value in where.items():
                match &= (table[column] == value).to_numpy() if column in table else False
            keep |= match
        return table[keep]


def check(
    run: str,
    item: str,
    value: float,
    direction: str,
    threshold: float,
    seed=None,
    note: str = "",
) -> dict:
    """One row of a claim function's result."""
    return {
        "run": str(run),
        "seed": np.nan if seed is None else float(seed),
        "item": str(item),
        "value": float(value),
        "direction": direction,
        "threshold": float(threshold),
        "note": note,
    }


def margins(frame: pd.DataFrame) -> pd.DataFrame:
    """``margin`` and ``holds`` of rows with value, direction and threshold."""
    frame = frame.copy()
    bad = sorted(set(frame.direction) - set(COMPARE))
    if bad:
        raise ValueError(f"claim rows: direction {bad} not allowed; allowed: {', '.join(COMPARE)}")
    below = frame.direction.isin(["<", "<="])
    with np.errstate(invalid="ignore"):
        frame["margin"] = np.where(
            below, frame.threshold - frame.value, frame.value - frame.threshold
        )
    frame["holds"] = [
        bool(COMPARE[d](v, t)) if not math.isnan(v) else False
        for v, d, t in zip(frame.value, frame.direction, frame.threshold, strict=True)
    ]
    frame["margin"] = frame.margin.fillna(-np.inf)
    return frame


def _worst(frame: pd.DataFrame, keys: list[str], scope: str) -> pd.DataFrame:
    """Per group of ``keys``: the row with the smallest margin (a failing one first), with the
    number of checks and of failed checks."""
    order = frame.assign(_fails=~frame.holds).sort_values(
        ["_fails", "margin"], ascending=[False, True], kind="stable"
    )
    groups = order.groupby(keys, sort=False, dropna=False)
    worst = groups.head(1).set_index(keys)
    counts = groups.agg(checks=("holds", "size"), failed=("holds", lambda h: int((~h).sum())))
    worst = worst.drop(columns=["checks", "failed", "_fails"], errors="ignore").join(counts)
    worst["holds"] = worst.failed == 0
    return worst.reset_index().assign(scope=scope)


def typed(table: pd.DataFrame) -> pd.DataFrame:
    """The claims table with its column types (an empty one too)."""
    table = table.reindex(columns=COLUMNS)
    floats = ["seed", "value", "threshold", "margin"]
    table[floats] = table[floats].astype(float)
    table[["checks", "failed"]] = table[["checks", "failed"]].astype("int64")
    table["holds"] = table.holds.astype(bool)
    return table


def aggregate(checks: pd.DataFrame) -> pd.DataFrame:
    """The ``check`` rows plus their ``run`` and ``claim`` aggregates (see module docstring)."""
    checks = checks.assign(scope="check", checks=1, failed=(~checks.holds).astype(int))
    per_run = _worst(checks, ["study", "claim", "run"], "run")
    per_claim = _worst(checks, ["study", "claim"], "claim")
    per_claim["item"] = per_claim.run.where(per_claim.run == "", per_claim.run + ": ") + (
        per_claim.item
    )
    per_claim["run"] = "all"
    per_claim["seed"] = np.nan
    return typed(pd.concat([checks, per_run, per_claim], ignore_index=True))


def applicable(tables: Tables) -> list[str]:
    """The registered claims whose tables the study has."""
    return [
        name
        for name, entry in register_claim.entries().items()
        if all(t in tables for t in entry.meta.get("tables", ()))
    ]


def evaluate_study(study: str, spec: dict, paths: dict, runs: dict | None = None) -> pd.DataFrame:
    """Every applicable claim of a study over its tables (``key -> parquet path``); the rows
    of :data:`COLUMNS`. A claim with nothing to check (one of its tables is empty, or it returns
    no rows: a masks study without an inverse test) has no rows."""
    context = Context(study, spec, runs or {})
    frames = []
    for name in applicable(Tables(paths)):
        entry = register_claim.entry(name)
        tables = Tables(paths)
        if any(tables[key].empty for key in entry.meta.get("tables", ())):
            continue  # e.g. a masks study that asks for no inverse test: nothing to check
        rows = register_claim.get(name)(tables, context)
        frame = pd.DataFrame(list(rows) if not isinstance(rows, pd.DataFrame) else rows)
        if frame.empty:
            continue
        kind = entry.meta.get("figure")
        default_figure = ", ".join(context.figures(kind)) if kind else ""
        if "figure" not in frame:
            frame["figure"] = default_figure
        frame["figure"] = frame.figure.fillna(default_figure)
        if "note" not in frame:
            frame["note"] = ""
        frame = margins(frame).assign(
            study=study,
            claim=name,
            tables=", ".join(f"{t}.parquet" for t in (tables.read or entry.meta.get("tables"))),
            statement=entry.doc.split("\n\n")[0].replace("\n", " "),
        )
        frames.append(frame)
    if not frames:
        return typed(pd.DataFrame())
    return aggregate(pd.concat(frames, ignore_index=True))


def check_study(study: str, spec: dict, paths: dict, runs: dict, out) -> pd.DataFrame:
    """:func:`evaluate_study`, written to ``out`` (parquet). ``runs``: each run's non-default
    hyperparameters (:attr:`pipeline.config.Run.nondefault`; the rule passes only these, so a
    new hyperparameter with a default re-checks nothing), resolved here."""
    from pipeline.config import resolve_hparams

    runs = {name: resolve_hparams(hp) for name, hp in runs.items()}
    table = evaluate_study(study, spec, paths, runs)
    io.write_parquet(out, table)
    return table


def collect(paths, out, html=None) -> pd.DataFrame:
    """Every study's claims table in one (``out``); with ``html``, the report's claims page."""
    frames = [f for f in (io.read_parquet(p) for p in paths) if len(f)]
    table = typed(pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
    io.write_parquet(out, table)
    if html is not None:
        write_html(table, html)
    return table
