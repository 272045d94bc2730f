"""Representation alignment between two zoo members (Godfrey et al. 2022, Sec. 5, and beyond).

Every (dis)similarity measure is a registered function ``fn(pair: Pair, **options) ->
DataFrame``; the alignment rule's code fingerprint (:mod:`pipeline.fingerprint`) reaches only
the measure the job computes, so an edit re-runs only that measure's jobs and the figures that
read them.

- ``grelu_procrustes`` / ``ortho_procrustes`` (diagonal layer pairs):
  :mod:`pipeline.modelsym.procrustes`;
- ``grelu_cka``, ``linear_cka`` (textbook) and ``ortho_cka`` (the paper's "orthogonal" CKA), all
  layer pairs: :mod:`pipeline.modelsym.cka`;
- ``weight_matching`` (git re-basin permutation alignment through the neuron structure, and the
  loss barrier on the linear path before and after): :mod:`pipeline.modelsym.matching`.

Feature measures return ``layer_a, layer_b, position_a, position_b, label_a, label_b,
similarity`` (+ ``distance`` for Procrustes); :func:`compare` adds ``metric``, ``a``, ``b``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pipeline.registry import Registry

register_similarity = Registry("similarity", "register_similarity", ("modelsym",), skip=1)


@dataclass(frozen=True)
class Pair:
    """Two zoo members: their member files and (for feature measures) their feature files."""

    a: Path | None = None
    b: Path | None = None
    features_a: Path | None = None
    features_b: Path | None = None
    data_dir: str = "data"
    device: str = "cpu"

    def features(self):
        """The two :class:`~pipeline.modelsym.features.FeatureFile` (error if not given)."""
        from pipeline.modelsym.features import FeatureFile

        if self.features_a is None or self.features_b is None:
            raise ValueError("this similarity measure reads feature files: give features_a/_b")
        fa, fb = FeatureFile(self.features_a), FeatureFile(self.features_b)
        if len(fa) != len(fb):
            raise ValueError(
                f"{fa.path} has {len(fa)} probe examples, {fb.path} {len(fb)}: "
                "features must come from the same probe set"
            )
        return fa, fb


def compare(metric: str, pair: Pair, options: dict | None = None):
    """Run registered measure ``metric`` on ``pair``; the table gains metric, a and b columns."""
    table = register_similarity.get(metric)(pair, **(options or {}))
    table.insert(0, "metric", metric)
    table.insert(1, "a", str(pair.a or pair.features_a))
    table.insert(2, "b", str(pair.b or pair.features_b))
    return table


def layer_pairs(fa, fb, pairs: str):
    """``"diagonal"``: same-position layers; ``"all"``: every (layer of a, layer of b)."""
    if pairs == "diagonal":
        if [layer.name for layer in fa.layers] != [layer.name for layer in fb.layers]:
            raise ValueError(
                f"diagonal layer pairs need the same layers in {fa.path} and {fb.path}"
            )
        return list(zip(fa.layers, fb.layers, strict=True))
    if pairs == "all":
        return [(la, lb) for la in fa.layers for lb in fb.layers]
    raise ValueError(f"pairs: {pairs!r} not allowed; allowed: all, diagonal")


def table_rows(pairs_values: list, extra: dict | None = None):
    """A feature measure's tidy table from ``[(layer_a, layer_b, similarity, {...})]``."""
    import pandas as pd

    rows = []
    for la, lb, value, more in pairs_values:
        rows.append(
            {
                "layer_a": la.name,
                "layer_b": lb.name,
                "position_a": la.position,
                "position_b": lb.position,
                "label_a": la.label,
                "label_b": lb.label,
                "similarity": float(value),
                **more,
                **(extra or {}),
            }
        )
    return pd.DataFrame(rows)


def collect_tables(paths, out) -> None:
    """Concatenate per-pair tables (alignment, stitching, rotation) into one table at ``out``."""
    import pandas as pd

    from pipeline import io

    frames = [io.read_parquet(p) for p in paths]
    io.write_parquet(out, pd.concat(frames, ignore_index=True) if frames else pd.DataFrame())
