"""Read-only access to one run's stored artifacts, each read lazily and kept.

A run directory holds ``hparams.json``, ``summary.json`` and ``history.parquet`` (always), the
extract HDF5 (checkpoint time series) and the trace HDF5 (per-step reductions) live elsewhere and
are optional: a metric declares what it needs (``@register_metric(name, needs=(...))``) and the
workflow hands it only those files.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline import io
from pipeline.config import TrainHparams
from pipeline.models.structure import NeuronStructure


class RunArtifacts:
    """A run as the metric cache sees it."""

    def __init__(
        self,
        name: str,
        run_dir: str | Path,
        extract: str | Path | None = None,
        trace: str | Path | None = None,
    ):
        self.name = name
        self.run_dir = Path(run_dir)
        self.extract_path = Path(extract) if extract else None
        self.trace_path = Path(trace) if trace else None
        self._params: dict[str, np.ndarray] = {}

    # -- always present ---------------------------------------------------------------------
    @cached_property
    def hparams(self) -> dict:
        return io.read_json(self.run_dir / "hparams.json")

    @cached_property
    def summary(self) -> dict:
        return io.read_json(self.run_dir / "summary.json")

    @property
    def seed(self) -> int:
        return int(self.hparams["seed"])

    @cached_property
    def train(self) -> TrainHparams:
        return TrainHparams(**self.hparams["train"])

    @cached_property
    def history(self):
        return io.read_parquet(
            self.run_dir / "history.parquet", ("step", "split", "loss", "accuracy", "lr")
        )

    # -- from the extract HDF5 ----------------------------------------------------------------
    def _extract(self):
        if self.extract_path is None:
            raise io.ArtifactError(
                f"{self.name}: this metric needs the run's extract HDF5 "
                "(declare needs=('extract', ...))"
            )
        return io.open_h5(self.extract_path)

    @cached_property
    def structure(self) -> NeuronStructure | None:
        with self._extract() as f:
            text = f.attrs.get("structure", "")
        return NeuronStructure.from_json(text) if text else None

    @cached_property
    def steps(self) -> np.ndarray:
        with self._extract() as f:
            return io.h5_dataset(f, "steps")

    def params(self, names) -> dict[str, np.ndarray]:
        """``name -> [T, ...]`` arrays over the checkpoints."""
        missing = [n for n in names if n not in self._params]
        if missing:
            with self._extract() as f:
                for n in missing:
                    self._params[n] = io.h5_dataset(f, f"params/{n}").astype(np.float64)
        return {n: self._params[n] for n in names}

    # -- from the trace HDF5 ------------------------------------------------------------------
    @cached_property
    def trace(self) -> dict | None:
        if self.trace_path is None:
            return None
        with io.open_h5(self.trace_path) as f:
            out = {
                k: io.h5_dataset(f, k).astype(np.float64) for k in ("g2", "u2", "colsum") if k in f
            }
            out["layout"] = {e["key"]: e for e in json.loads(f.attrs["layout"])}
            out["update"] = str(f.attrs["update"])
        out["steps"] = len(out.get("g2", []))
        last = int(self.summary["steps"])
        if out["steps"] < last:
            raise io.ArtifactError(
                f"{self.trace_path}: holds {out['steps']} steps but the run made {last}"
            )
        return out

    def trace_columns(self, kind: str, key: str) -> np.ndarray:
        entry = self.trace["layout"][key]
        return self.trace[kind][:, entry["offset"] : entry["offset"] + entry["size"]]
