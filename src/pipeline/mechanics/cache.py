"""The cache stage: one registered metric over all runs of a study -> tidy parquet tables."""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline import io
from pipeline.mechanics.artifacts import RunArtifacts
from pipeline.metric_registry import register_metric


def deviations(table: pd.DataFrame) -> pd.DataFrame:
    """Per run, layer and quantity: the largest |empirical - theory| relative to the size of the
    terms (magnitude), for the discrete and the continuous prediction; NaN where none applies."""
    if table.empty:
        return pd.DataFrame(
            columns=[
                "run",
                "layer",
                "quantity",
                "max_rel_dev_discrete",
                "max_rel_dev_continuous",
                "note",
            ]
        )
    scale = np.maximum(table["magnitude"].abs().to_numpy(), np.finfo(float).tiny)
    emp = table["empirical"].to_numpy()
    frame = table[["run", "layer", "quantity", "note"]].copy()
    frame["max_rel_dev_discrete"] = np.abs(emp - table["theory_discrete"].to_numpy()) / scale
    frame["max_rel_dev_continuous"] = np.abs(emp - table["theory_continuous"].to_numpy()) / scale
    return (
        frame.groupby(["run", "layer", "quantity", "note"], sort=False, observed=True)
        .agg("max")
        .reset_index()
    )


def cache_metric(metric: str, runs: list[dict], table_out, summary_out) -> pd.DataFrame:
    """Compute ``metric`` for every run (dicts with name, run_dir and, as the metric needs,
    extract and trace) and write the tidy table and its per-layer deviation summary."""
    fn = register_metric.get(metric)
    frames = [
        fn(RunArtifacts(r["name"], r["run_dir"], r.get("extract"), r.get("trace"))) for r in runs
    ]
    table = pd.concat(frames, ignore_index=True)
    io.write_parquet(table_out, table)
    io.write_parquet(summary_out, deviations(table))
    return table
