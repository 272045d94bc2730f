"""Set arithmetic on binary masks: sharing, IoU, intersection over min, remaining weights.

A mask is ``{parameter: bool tensor}``; ``|m|`` counts its kept weights. Every table has one row
per layer (``kind = layer``), per role (``kind = role``: all input / hidden / output layers
together) and in total (``kind = total``): counts are summed over the parameters of the scope
before any ratio is taken (so totals weight each layer by its size, as in the paper). A ratio
with an empty denominator is NaN.

- sharing of mask ``i``: ``|m_i & (OR_{j != i} m_j)| / |m_i|``;
- IoU and IoMin of masks ``a, b``: ``|a & b| / |a | b|`` and ``|a & b| / min(|a|, |b|)``;
- remaining of mask ``i`` relative to reference ``r``: ``|m_i & m_r| / |m_r|``;
- transfer sharing of the ``t``-th mask: ``|m_t & (OR_{s < t} m_s)| / |m_t|``.
"""

from __future__ import annotations

from functools import reduce

import pandas as pd
import torch

from pipeline.masks.layers import ROLES, MaskedLayer


def _scopes(layers: list[MaskedLayer]) -> list[tuple[str, str, tuple[str, ...]]]:
    """``(kind, scope name, parameters)``: each layer, each role present, and the total."""
    out = [("layer", layer.name, layer.params) for layer in layers]
    for role in ROLES:
        params = tuple(p for layer in layers if layer.role == role for p in layer.params)
        if params:
            out.append(("role", role, params))
    out.append(("total", "total", tuple(p for layer in layers for p in layer.params)))
    return out


def _count(mask: dict[str, torch.Tensor], params) -> int:
    return sum(int(mask[p].sum()) for p in params)


def _ratio(num: int, den: int) -> float:
    return num / den if den else float("nan")


def _union(masks) -> dict[str, torch.Tensor]:
    masks = list(masks)
    return {p: reduce(torch.logical_or, [m[p] for m in masks]) for p in masks[0]}


def _and(a: dict, b: dict) -> dict:
    return {p: a[p] & b[p] for p in a}


def sharing(masks: dict[str, dict], layers: list[MaskedLayer]) -> pd.DataFrame:
    """Rows ``(mask, kind, layer, count, shared, sharing)`` for every mask against the union of
    the others."""
    if len(masks) < 2:
        raise ValueError(f"sharing needs at least two masks, got {list(masks)}")
    rows = []
    for name, mask in masks.items():
        shared = _and(mask, _union(m for n, m in masks.items() if n != name))
        for kind, scope, params in _scopes(layers):
            count, both = _count(mask, params), _count(shared, params)
            rows.append(
                {
                    "mask": name,
                    "kind": kind,
                    "layer": scope,
                    "count": count,
                    "shared": both,
                    "sharing": _ratio(both, count),
                }
            )
    return pd.DataFrame(rows)


def overlap(a: dict, b: dict, layers: list[MaskedLayer]) -> pd.DataFrame:
    """Rows ``(kind, layer, count_a, count_b, intersection, union, iou, iomin)``."""
    inter, union = _and(a, b), {p: a[p] | b[p] for p in a}
    rows = []
    for kind, scope, params in _scopes(layers):
        na, nb, ni, nu = (_count(m, params) for m in (a, b, inter, union))
        rows.append(
            {
                "kind": kind,
                "layer": scope,
                "count_a": na,
                "count_b": nb,
                "intersection": ni,
                "union": nu,
                "iou": _ratio(ni, nu),
                "iomin": _ratio(ni, min(na, nb)),
            }
        )
    return pd.DataFrame(rows)


def pairwise_overlap(masks: dict[str, dict], pairs, layers: list[MaskedLayer]) -> pd.DataFrame:
    """:func:`overlap` for each ``(a, b)`` in ``pairs``, with columns ``a`` and ``b``."""
    frames = []
    for a, b in pairs:
        missing = [n for n in (a, b) if n not in masks]
        if missing:
            raise KeyError(
                f"overlap pair ({a}, {b}): no mask named {missing}; masks: " + ", ".join(masks)
            )
        frames.append(overlap(masks[a], masks[b], layers).assign(a=a, b=b))
    return pd.concat(frames, ignore_index=True)


def remaining(masks: dict[str, dict], reference: str, layers: list[MaskedLayer]) -> pd.DataFrame:
    """Rows ``(mask, kind, layer, reference_count, kept, remaining)`` for every mask but the
    reference."""
    ref = masks[reference]
    rows = []
    for name, mask in masks.items():
        if name == reference:
            continue
        kept = _and(mask, ref)
        for kind, scope, params in _scopes(layers):
            n_ref, n_kept = _count(ref, params), _count(kept, params)
            rows.append(
                {
                    "mask": name,
                    "kind": kind,
                    "layer": scope,
                    "reference_count": n_ref,
                    "kept": n_kept,
                    "remaining": _ratio(n_kept, n_ref),
                }
            )
    return pd.DataFrame(rows)


def transfer_sharing(masks: dict[str, dict], layers: list[MaskedLayer]) -> pd.DataFrame:
    """Rows ``(mask, position, kind, layer, count, shared, sharing)``: each mask (in the given
    order) against the union of the masks before it."""
    names = list(masks)
    rows = []
    for t, name in enumerate(names[1:], start=1):
        shared = _and(masks[name], _union(masks[n] for n in names[:t]))
        for kind, scope, params in _scopes(layers):
            count, both = _count(masks[name], params), _count(shared, params)
            rows.append(
                {
                    "mask": name,
                    "position": t,
                    "kind": kind,
                    "layer": scope,
                    "count": count,
                    "shared": both,
                    "sharing": _ratio(both, count),
                }
            )
    return pd.DataFrame(rows)
