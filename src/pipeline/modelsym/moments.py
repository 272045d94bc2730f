"""Streamed first and second moments of features, per channel, accumulated over row blocks.

Features of a layer are ``H [N, C, *spatial]``; a *channel* ``c`` is the vector ``H[:, c]`` of
``N * prod(spatial)`` entries. Everything the Procrustes measures and activation matching need
is a sum over those entries, so it accumulates block by block (``C = sum_b X_b^T Y_b``) and no
feature set is held whole.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """``[n, C, *spatial] -> [n * prod(spatial), C]``: rows are (sample, position) entries."""
    if x.ndim == 2:
        return x
    return x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])


@dataclass
class Moments:
    """Per-channel sums of one layer and, for a pair of layers, the channel cross products."""

    count: int  # entries per channel (N * prod(spatial))
    sum_a: torch.Tensor  # [Ca]
    sq_a: torch.Tensor  # [Ca] sum of squares
    sum_b: torch.Tensor | None = None
    sq_b: torch.Tensor | None = None
    cross: torch.Tensor | None = None  # [Ca, Cb] sum over entries of a_c * b_d

    @property
    def norm_a(self) -> torch.Tensor:
        return self.sq_a.clamp_min(0).sqrt()

    @property
    def norm_b(self) -> torch.Tensor:
        return self.sq_b.clamp_min(0).sqrt()

    @property
    def mean_a(self) -> torch.Tensor:
        return self.sum_a / self.count

    @property
    def mean_b(self) -> torch.Tensor:
        return self.sum_b / self.count

    def centred_norm_a(self) -> torch.Tensor:
        return (self.sq_a - self.sum_a**2 / self.count).clamp_min(0).sqrt()

    def centred_norm_b(self) -> torch.Tensor:
        return (self.sq_b - self.sum_b**2 / self.count).clamp_min(0).sqrt()

    def centred_cross(self) -> torch.Tensor:
        return self.cross - torch.outer(self.sum_a, self.sum_b) / self.count

    def correlation(self) -> torch.Tensor:
        """Pearson correlation ``[Ca, Cb]`` between channels; 0 where a channel is constant."""
        sa, sb = self.centred_norm_a(), self.centred_norm_b()
        denom = torch.outer(sa, sb)
        return torch.where(
            denom > 0, self.centred_cross() / denom.clamp_min(1e-300), torch.zeros_like(denom)
        )


def single_moments(blocks) -> Moments:
    """Per-channel count, sum and sum of squares over ``(start, block)`` pairs of one layer,
    accumulated in float64 whatever the blocks' dtype."""
    count, s, sq = 0, None, None
    for _, x in blocks:
        x = x.to(torch.float64)
        dims = (0, *range(2, x.ndim))  # every axis but the channel axis
        s = x.sum(dims) if s is None else s + x.sum(dims)
        sq = (x * x).sum(dims) if sq is None else sq + (x * x).sum(dims)
        count += x.numel() // x.shape[1]
    return Moments(count, s, sq)


def pair_moments(blocks_a, blocks_b) -> Moments:
    """Sums, sums of squares and the cross product matrix of two layers over the same probe
    rows; the two block streams must cut the same row ranges and have equal spatial shapes."""
    count, acc = 0, None
    for (sa, xa), (sb, xb) in zip(blocks_a, blocks_b, strict=True):
        if sa != sb or len(xa) != len(xb):
            raise ValueError("feature blocks of the two layers cover different probe rows")
        if xa.shape[2:] != xb.shape[2:]:
            raise ValueError(
                f"layers with spatial shapes {tuple(xa.shape[2:])} and "
                f"{tuple(xb.shape[2:])} have no channel-wise correspondence"
            )
        ra, rb = channels_last(xa), channels_last(xb)
        parts = (ra.sum(0), (ra * ra).sum(0), rb.sum(0), (rb * rb).sum(0), ra.T @ rb)
        acc = parts if acc is None else tuple(p + q for p, q in zip(acc, parts, strict=True))
        count += ra.shape[0]
    if acc is None:
        raise ValueError("no feature rows")
    return Moments(count, acc[0], acc[1], acc[2], acc[3], acc[4])


def tensor_blocks(x: torch.Tensor, rows: int | None = None, first: int = 0):
    """``(start, block)`` pairs of an in-memory tensor from row ``first`` on (the same stream a
    feature file gives)."""
    rows = rows or len(x)
    for start in range(first, len(x), rows):
        yield start, x[start : start + rows]
