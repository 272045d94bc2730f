"""Procrustes distances between two layers' features, invariant to G_ReLU or to O(n).

Features ``X [N, C, *spatial]`` are read as the matrix of ``N * prod(spatial)`` rows by ``C``
channel columns; no centring (Godfrey et al.'s definitions).

- G_ReLU-Procrustes: normalise every channel to unit norm (dead channels stay 0), take the
  channel cosine matrix ``C_ab = <X_a, Y_b> / (|X_a| |Y_b|)``, the assignment ``pi`` maximising
  ``sum_a C_{a, pi(a)}`` (Hungarian), and
  ``d = sqrt((|X^|^2 + |Y^|^2 - 2 sum_a C_{a, pi(a)}) / (4 n))`` with ``n`` channels and
  ``|X^|^2`` the number of live channels: ``sqrt((1 - mean matched cosine) / 2)`` without dead
  ones. Invariant to channel permutations and positive per-channel scalings (P D).
- Orthogonal Procrustes: normalise each whole matrix to unit Frobenius norm; then
  ``min_Q |X^ Q - Y^|_F^2 = 2 - 2 |X^T Y|_*`` (nuclear norm) and ``d = sqrt(2 - 2|C|_*) / 2``.
  Invariant to any orthogonal map of the channels.

Both report similarity ``1 - d``. The only data pass is the channel cross product
``sum_b X_b^T Y_b`` and the channel norms (:mod:`pipeline.modelsym.moments`).
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from pipeline.modelsym.moments import Moments, pair_moments, tensor_blocks
from pipeline.modelsym.similarity import layer_pairs, register_similarity, table_rows


def grelu_from_moments(m: Moments) -> tuple[float, np.ndarray]:
    """G_ReLU-Procrustes distance and the matching ``pi`` (``-1`` for unmatched channels)."""
    na, nb = m.norm_a, m.norm_b
    denom = torch.outer(na, nb)
    cos = torch.where(denom > 0, m.cross / denom.clamp_min(1e-300), torch.zeros_like(denom))
    rows, cols = linear_sum_assignment(cos.cpu().numpy(), maximize=True)
    matched = float(cos[rows, cols].sum())
    n = max(cos.shape)
    live = int((na > 0).sum()) + int((nb > 0).sum())
    pi = np.full(cos.shape[0], -1)
    pi[rows] = cols
    return float(np.sqrt(max(live - 2 * matched, 0.0) / (4 * n))), pi


def ortho_from_moments(m: Moments) -> float:
    """Orthogonal Procrustes distance from the cross product and the total norms."""
    total = m.sq_a.sum().clamp_min(0).sqrt() * m.sq_b.sum().clamp_min(0).sqrt()
    if total == 0:
        return float("nan")
    nuclear = float(torch.linalg.svdvals(m.cross / total).sum())
    return float(np.sqrt(max(2.0 - 2.0 * nuclear, 0.0)) / 2.0)


def grelu_procrustes(x: torch.Tensor, y: torch.Tensor, rows: int | None = None) -> float:
    """G_ReLU-Procrustes distance of in-memory features ``[N, C, ...]`` (rows per block)."""
    return grelu_from_moments(pair_moments(tensor_blocks(x, rows), tensor_blocks(y, rows)))[0]


def ortho_procrustes(x: torch.Tensor, y: torch.Tensor, rows: int | None = None) -> float:
    """Orthogonal Procrustes distance of in-memory features ``[N, C, ...]``."""
    return ortho_from_moments(pair_moments(tensor_blocks(x, rows), tensor_blocks(y, rows)))


def _diagonal(pair, distance_fn, rows):
    fa, fb = pair.features()
    out = []
    for la, lb in layer_pairs(fa, fb, "diagonal"):
        r = rows or min(fa.block_rows(la.name), fb.block_rows(lb.name))
        m = pair_moments(fa.blocks(la.name, r), fb.blocks(lb.name, r))
        d = distance_fn(m)
        out.append((la, lb, 1.0 - d, {"distance": d}))
    return table_rows(out)


@register_similarity("grelu_procrustes")
def grelu_procrustes_similarity(pair, rows: int = 0):
    """1 - G_ReLU-Procrustes distance at every diagonal layer pair (``rows``: block size)."""
    return _diagonal(pair, lambda m: grelu_from_moments(m)[0], rows)


@register_similarity("ortho_procrustes")
def ortho_procrustes_similarity(pair, rows: int = 0):
    """1 - orthogonal Procrustes distance at every diagonal layer pair."""
    return _diagonal(pair, ortho_from_moments, rows)
