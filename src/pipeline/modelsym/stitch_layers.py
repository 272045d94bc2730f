"""Stitching layers: channel maps ``y = W x`` from the bottom network's features to the top's.

``W [n_out, n_in]`` acts on axis 1 (a 1x1 convolution on ``[N, C, H, W]``, a matrix on
``[N, C]``). Every type is a registered builder ``fn(n_in, n_out, **options) -> StitchLayer``:

- ``linear``: ``W`` (default 1x1-conv init), trained and evaluated as is;
- ``low_rank``: ``W = U V`` with ``V: n_in -> r``, ``U: r -> n_out``;
- ``lasso``: ``W`` with the extra loss ``lam * sum |W_ij|``; evaluated with ``|W_ij| < 1e-4``
  set to 0;
- ``birkhoff`` (G_ReLU): ``M diag(s)``, ``M`` doubly stochastic, ``s >= 0``, extra loss
  ``-alpha |M|_F``; evaluated as ``P diag(s)``, ``P`` the Hungarian rounding of ``M``;
- ``permutation``: not trained: ``P`` (or ``P D``) from activation matching;
- ``orthogonal``: ``Q`` orthogonal (torch's parametrisation), initialised by Procrustes.

Birkhoff (G_ReLU) layer, as in Godfrey et al.: ``M_0 = Sinkhorn_100(U(0,1))``, ``s = 1``; after
every optimizer step the *projection* ``M <- Sinkhorn_k(ReLU(M))`` (k = 16; clip then
normalise, not the Euclidean projection: exactly column-stochastic, rows approximately),
``s <- ReLU(s)``; two phases, the first with the scales off. ``P`` is cached while ``M`` is
unchanged. Weight decay applies to ``s`` only.
"""

from __future__ import annotations

import math
from abc import ABCMeta, abstractmethod

import torch
import torch.nn as nn
from scipy.optimize import linear_sum_assignment

from pipeline.modelsym import register_stitching_layer


def apply_channels(weight: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y[:, i, ...] = sum_j weight[i, j] x[:, j, ...]``."""
    if x.ndim == 2:
        return x @ weight.T
    return torch.einsum("oi,ni...->no...", weight, x)


def sinkhorn(
    a: torch.Tensor, iters: int | None = 16, tol: float | None = None, max_iters: int = 100_000
) -> torch.Tensor:
    """Alternate row and column normalisation of a non-negative matrix (a zero sum divides by
    1). ``iters`` rounds, or with ``tol`` until every row and column sum is within ``tol`` of 1."""
    rounds = iters if tol is None else max_iters
    for _ in range(rounds):
        r = a.sum(1, keepdim=True)
        a = a / torch.where(r == 0, torch.ones_like(r), r)
        c = a.sum(0, keepdim=True)
        a = a / torch.where(c == 0, torch.ones_like(c), c)
        if tol is not None and (a.sum(1) - 1).abs().max() <= tol:
            break
    return a


def hungarian(m: torch.Tensor) -> torch.Tensor:
    """The permutation matrix maximising ``sum_i m[i, pi(i)]``."""
    rows, cols = linear_sum_assignment(m.detach().cpu().numpy(), maximize=True)
    p = torch.zeros_like(m)
    p[torch.as_tensor(rows), torch.as_tensor(cols)] = 1.0
    return p


def _default_matrix(n_out: int, n_in: int) -> torch.Tensor:
    """A 1x1 convolution's default init: U(-1/sqrt(n_in), 1/sqrt(n_in))."""
    bound = 1.0 / math.sqrt(n_in)
    return torch.empty(n_out, n_in).uniform_(-bound, bound)


class StitchLayer(nn.Module, metaclass=ABCMeta):
    """Base: subclasses define :meth:`weight`; the hooks below default to plain training."""

    trainable = True
    needs_fit = False

    def __init__(self, n_in: int, n_out: int):
        super().__init__()
        self.n_in, self.n_out = n_in, n_out

    @abstractmethod
    def weight(self) -> torch.Tensor:
        """The map ``[n_out, n_in]`` of the current mode (train: as trained; eval: as used)."""

    def forward(self, x):
        return apply_channels(self.weight().to(x.dtype), x)

    def regulariser(self) -> torch.Tensor:
        return torch.zeros(())

    @torch.no_grad()
    def project(self) -> None:
        """Called after every optimizer step."""

    def fit(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Data-driven initialisation from bottom features ``x`` and top features ``y``."""

    def param_groups(self, wd: float) -> list[dict]:
        return [{"params": [p for p in self.parameters() if p.requires_grad], "weight_decay": wd}]

    def phases(self, epochs: int) -> list[int]:
        """Epochs per training phase (the best weights are reloaded between phases)."""
        return [epochs]

    def set_phase(self, phase: int) -> None:
        """Switch to phase ``phase`` (0-based)."""

    def report(self) -> dict:
        """Numbers about the evaluated map, for the results table."""
        return {}


class Linear(StitchLayer):
    def __init__(self, n_in, n_out):
        super().__init__(n_in, n_out)
        self.matrix = nn.Parameter(_default_matrix(n_out, n_in))

    def weight(self):
        return self.matrix


class LowRank(StitchLayer):
    def __init__(self, n_in, n_out, rank):
        super().__init__(n_in, n_out)
        if not 1 <= rank <= min(n_in, n_out):
            raise ValueError(f"low_rank: rank {rank} must be in 1..{min(n_in, n_out)}")
        self.down = nn.Parameter(_default_matrix(rank, n_in))
        self.up = nn.Parameter(_default_matrix(n_out, rank))

    def weight(self):
        return self.up @ self.down


class Lasso(StitchLayer):
    """``W`` with an L1 penalty; evaluated with ``|W_ij| < zero_below`` set to 0."""

    def __init__(self, n_in, n_out, lam, zero_below=1e-4, sparse_below=1e-3):
        super().__init__(n_in, n_out)
        self.matrix = nn.Parameter(_default_matrix(n_out, n_in))
        self.lam, self.zero_below, self.sparse_below = lam, zero_below, sparse_below

    def weight(self):
        if self.training:
            return self.matrix
        return torch.where(self.matrix.abs() < self.zero_below, 0.0, self.matrix)

    def regulariser(self):
        return self.lam * self.matrix.abs().sum()

    def report(self):
        return {"sparsity": float((self.matrix.abs() <= self.sparse_below).double().mean())}


class Birkhoff(StitchLayer):
    def __init__(
        self, n_in, n_out, alpha=0.1, sinkhorn_iters=16, init_iters=100, scales_from_start=False
    ):
        super().__init__(n_in, n_out)
        if n_in != n_out:
            raise ValueError(
                f"birkhoff: a doubly stochastic map needs n_in == n_out; got {n_in} -> {n_out}"
            )
        self.mixing = nn.Parameter(sinkhorn(torch.rand(n_out, n_in), init_iters))
        self.scales = nn.Parameter(torch.ones(n_in))
        self.alpha, self.iters = alpha, sinkhorn_iters
        self.scales_from_start = scales_from_start
        self.use_scales = scales_from_start
        self._rounded = None

    def permutation(self) -> torch.Tensor:
        """Hungarian rounding of ``M``, cached while ``M`` is unchanged."""
        m = self.mixing.detach()
        if self._rounded is None or not torch.equal(self._rounded[0], m):
            self._rounded = (m.clone(), hungarian(m))
        return self._rounded[1]

    def weight(self):
        m = self.mixing if self.training else self.permutation()
        return m * self.scales[None, :] if self.use_scales else m

    def regulariser(self):
        return -self.alpha * torch.linalg.matrix_norm(self.mixing)

    @torch.no_grad()
    def project(self):
        self.mixing.copy_(sinkhorn(self.mixing.clamp_min(0), self.iters))
        self.scales.clamp_(min=0)

    def param_groups(self, wd):
        groups = [{"params": [self.mixing], "weight_decay": 0.0}]
        if self.use_scales:
            groups.append({"params": [self.scales], "weight_decay": wd})
        return groups

    def phases(self, epochs):
        if self.scales_from_start:
            return [epochs]
        first = epochs // 2
        return [first, epochs - first]

    def set_phase(self, phase):
        self.use_scales = self.scales_from_start or phase >= 1

    def report(self):
        m = self.mixing.detach()
        return {
            "m_norm": float(torch.linalg.matrix_norm(m)),
            "projection_error": float(
                torch.maximum((m.sum(1) - 1).abs().max(), (m.sum(0) - 1).abs().max())
            ),
            "rounding_distance": float(torch.linalg.matrix_norm(m - hungarian(m))),
            "sparsity": 1.0 - 1.0 / self.n_in,
        }


class Permutation(StitchLayer):
    """``P`` (``rescale``: ``P D`` with least-squares ``D``) from activation matching."""

    trainable = False
    needs_fit = True

    def __init__(self, n_in, n_out, rescale=False):
        super().__init__(n_in, n_out)
        self.rescale = rescale
        self.register_buffer("matrix", torch.zeros(n_out, n_in))
        self.live_fraction = float("nan")
        self.fitted = False

    def fit(self, x, y):
        from pipeline.modelsym.matching import activation_matching

        p, d, live = activation_matching(x, y)
        w = torch.zeros(self.n_out, self.n_in, dtype=self.matrix.dtype)
        ok = p >= 0
        w[torch.arange(self.n_out)[ok], p[ok]] = d[ok].clamp_min(0) if self.rescale else 1.0
        self.matrix.copy_(w)
        self.live_fraction = float(live.double().mean())
        self.fitted = True

    def weight(self):
        if not self.fitted:
            raise RuntimeError("permutation stitching layer used before fit()")
        return self.matrix

    def report(self):
        return {"live_fraction": self.live_fraction, "sparsity": 1.0 - 1.0 / self.n_in}


class Orthogonal(StitchLayer):
    """``Q`` with orthonormal rows or columns (torch's orthogonal parametrisation)."""

    needs_fit = True

    def __init__(self, n_in, n_out, init="procrustes"):
        super().__init__(n_in, n_out)
        if init not in ("procrustes", "random"):
            raise ValueError(f"orthogonal: init {init!r} not allowed; allowed: procrustes, random")
        self.init = init
        self.map = nn.utils.parametrizations.orthogonal(nn.Linear(n_in, n_out, bias=False))

    def fit(self, x, y):
        if self.init != "procrustes":
            return
        from pipeline.modelsym.moments import pair_moments, tensor_blocks

        cross = pair_moments(tensor_blocks(y), tensor_blocks(x)).cross  # sum y x^T
        u, _, vh = torch.linalg.svd(cross, full_matrices=False)
        with torch.no_grad():
            self.map.weight = (u @ vh).to(self.map.weight.dtype)

    def weight(self):
        return self.map.weight


@register_stitching_layer("linear")
def linear(n_in, n_out):
    """Unconstrained 1x1 map."""
    return Linear(n_in, n_out)


@register_stitching_layer("low_rank")
def low_rank(n_in, n_out, rank: int = 1):
    """Rank-``rank`` 1x1 map ``U V``."""
    return LowRank(n_in, n_out, rank)


@register_stitching_layer("lasso")
def lasso(n_in, n_out, lam: float = 1e-3, zero_below: float = 1e-4, sparse_below: float = 1e-3):
    """L1-regularised 1x1 map (``lam``: penalty weight)."""
    return Lasso(n_in, n_out, lam, zero_below, sparse_below)


@register_stitching_layer("birkhoff")
def birkhoff(
    n_in,
    n_out,
    alpha: float = 0.1,
    sinkhorn_iters: int = 16,
    init_iters: int = 100,
    scales_from_start: bool = False,
):
    """G_ReLU layer ``M diag(s)`` by projected SGD; ``P diag(s)`` at evaluation."""
    return Birkhoff(n_in, n_out, alpha, sinkhorn_iters, init_iters, scales_from_start)


@register_stitching_layer("permutation")
def permutation(n_in, n_out, rescale: bool = False):
    """Fixed permutation from activation matching (``rescale``: times least-squares scales)."""
    return Permutation(n_in, n_out, rescale)


@register_stitching_layer("orthogonal")
def orthogonal(n_in, n_out, init: str = "procrustes"):
    """Trained orthogonal map, initialised by orthogonal Procrustes on the features."""
    return Orthogonal(n_in, n_out, init)
