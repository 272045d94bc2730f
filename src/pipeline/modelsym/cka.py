"""CKA with the unbiased HSIC estimator, for three kernels.

For zero-diagonal ``N x N`` kernels ``K``, ``L`` (Song et al. 2012; Nguyen, Raghu & Kornblith)::

    HSIC_1(K, L) = [tr(K L) + (1'K1)(1'L1) / ((N-1)(N-2)) - 2/(N-2) 1'K L 1] / (N (N-3))
    CKA(K, L)    = HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))

Kernels, on features ``H [N, C, *spatial]``:

- ``grelu``: centre every channel (mean over N and positions), scale it to unit norm, then
  ``K_ij = max_c <H_ic, H_jc>`` (inner product over positions), ``K_ii = 0``. Permutations and
  positive scalings of channels leave it unchanged. Computed as batched Gram matrices over
  channel chunks (``bmm`` of ``[c, n, S] x [c, S, n]``) with a running elementwise max, block by
  block of rows: never a loop over samples.
- ``linear`` (textbook linear CKA): ``K = X X^T`` of the flattened, mean-centred features;
  invariant to orthogonal maps and isotropic scaling of the features.
- ``ortho`` (the paper's "orthogonal" CKA): the linear kernel after the ``grelu`` kernel's
  per-channel centring and normalisation.

Each kernel reads the feature stream twice (moments, then the row-block pairs ``K[I, J]``);
all layer pairs reuse the kernels, with one model's kernels held and the other's made one at a
time. Defaults: kernels in float32 from blocks of at most 500 rows; the channel moments and
every sum over a kernel (``tr(K L)``, row sums) are in float64. That gives the float64
one-block value to ~1e-9 relative at 5,000 samples of a 64-channel 16x16 layer, and within
1e-7 on the embedded default's 297 samples (tests/test_alignment.py checks the agreement on
drawn features), for less time and memory (benchmarks/bench_alignment.py);
``dtype: float64`` (and ``rows: 0``: blocks sized by the feature file's memory budget) remain
selectable.
"""

from __future__ import annotations

import itertools

import torch

from pipeline import devices
from pipeline.modelsym.moments import single_moments, tensor_blocks
from pipeline.modelsym.similarity import layer_pairs, register_similarity, table_rows

ROWS = 500  # default rows per block (capped by the feature file's budget; 0: the budget alone)


def hsic1(K: torch.Tensor, L: torch.Tensor) -> float:
    """Unbiased HSIC of two symmetric zero-diagonal kernels."""
    return _hsic(_stats(K), _stats(L), float((K * L).sum(dtype=torch.float64)))


def _stats(K):
    n = K.shape[0]
    if n < 4:
        raise ValueError(f"unbiased HSIC needs at least 4 samples; got {n}")
    rows = K.sum(1, dtype=torch.float64)
    return n, rows, float(rows.sum())


def _hsic(sk, sl, trace: float) -> float:
    n, rk, tk = sk
    _, rl, tl = sl
    return (trace + tk * tl / ((n - 1) * (n - 2)) - 2.0 / (n - 2) * float(rk @ rl)) / (n * (n - 3))


def cka(K: torch.Tensor, L: torch.Tensor) -> float:
    """CKA of two symmetric zero-diagonal kernels with the unbiased HSIC."""
    sk, sl = _stats(K), _stats(L)
    kk = _hsic(sk, sk, float((K * K).sum(dtype=torch.float64)))
    ll = _hsic(sl, sl, float((L * L).sum(dtype=torch.float64)))
    kl = _hsic(sk, sl, float((K * L).sum(dtype=torch.float64)))
    return kl / (kk * ll) ** 0.5 if kk > 0 and ll > 0 else float("nan")


def block_gram(blocks, n: int, prepare, product, dtype=torch.float64) -> torch.Tensor:
    """``K[I, J] = product(prepare(X_I), prepare(X_J))`` over row blocks, symmetric, zero
    diagonal. ``blocks(start, dtype)`` returns a fresh ``(start, block)`` stream from row
    ``start`` on, so the pass of block ``I`` reads only the blocks after it."""
    K = torch.zeros(n, n, dtype=dtype)
    for i0, bi in blocks(0, dtype):
        pi = prepare(bi.to(dtype))
        ni = bi.shape[0]
        later = ((j0, len(bj), prepare(bj.to(dtype))) for j0, bj in blocks(i0 + ni, dtype))
        for j0, nj, pj in itertools.chain([(i0, ni, pi)], later):
            g = product(pi, pj)
            K[i0 : i0 + ni, j0 : j0 + nj] = g
            K[j0 : j0 + nj, i0 : i0 + ni] = g.T
    K.fill_diagonal_(0)
    return K


def _standardiser(blocks, dtype):
    """Per-channel centring and unit-norm scaling (constant channels become 0)."""
    m = single_moments(blocks(0, torch.float64))
    mean, norm = m.mean_a.to(dtype), m.centred_norm_a().to(dtype)
    scale = torch.where(norm > 0, 1.0 / norm.clamp_min(1e-300), torch.zeros_like(norm))
    shape = (1, -1) + (1,) * 8

    def standardise(x):
        view = shape[: x.ndim]
        return (x - mean.reshape(view)) * scale.reshape(view)

    return standardise


def grelu_kernel(blocks, n: int, channel_chunk: int = 8, dtype=torch.float64) -> torch.Tensor:
    """The max-over-channels kernel of a layer streamed as ``blocks()``."""
    standardise = _standardiser(blocks, dtype)

    def prepare(x):
        z = standardise(x)
        return z.reshape(z.shape[0], z.shape[1], -1).transpose(0, 1).contiguous()  # [C, n, S]

    def product(zi, zj):
        out = None
        for c0 in range(0, zi.shape[0], channel_chunk):
            g = torch.bmm(
                zi[c0 : c0 + channel_chunk], zj[c0 : c0 + channel_chunk].transpose(1, 2)
            ).amax(0)
            out = g if out is None else torch.maximum(out, g)
        return out

    return block_gram(blocks, n, prepare, product, dtype)


def linear_kernel(
    blocks, n: int, standardise_channels: bool = False, dtype=torch.float64
) -> torch.Tensor:
    """``X X^T`` of the mean-centred flattened features (``standardise_channels``: of the
    per-channel centred and normalised ones instead)."""
    if standardise_channels:
        centre = _standardiser(blocks, dtype)
    else:
        m = single_moments((s, b.reshape(b.shape[0], -1)) for s, b in blocks(0, torch.float64))
        mean = m.mean_a.to(dtype)

        def centre(x):
            return x.reshape(x.shape[0], -1) - mean

    def prepare(x):
        return centre(x).reshape(x.shape[0], -1)

    return block_gram(blocks, n, prepare, lambda a, b: a @ b.T, dtype)


def _kernel(kind: str, blocks, n, channel_chunk, dtype):
    if kind == "grelu":
        return grelu_kernel(blocks, n, channel_chunk, dtype)
    return linear_kernel(blocks, n, kind == "ortho", dtype)


def kernel_of(
    x: torch.Tensor,
    kind: str = "grelu",
    rows: int | None = None,
    channel_chunk: int = 8,
    dtype=torch.float64,
) -> torch.Tensor:
    """The ``grelu``, ``linear`` or ``ortho`` kernel of in-memory features ``[N, C, ...]``."""

    def blocks(start, _dtype):
        return tensor_blocks(x, rows, start)

    return _kernel(kind, blocks, len(x), channel_chunk, dtype)


def _cka_table(pair, kind, pairs, rows, channel_chunk, dtype):
    devices.dtype(dtype)  # a clear error for any other name, before any work
    fa, fb = pair.features()
    wanted = layer_pairs(fa, fb, pairs)
    n = len(fa)

    def kernel(ff, layer):
        r = min(rows, ff.block_rows(layer.name)) if rows else ff.block_rows(layer.name)

        def blocks(start, block_dtype):
            return ff.blocks(layer.name, r, block_dtype, first=start)

        return _kernel(kind, blocks, n, channel_chunk, devices.dtype(dtype))

    held = {}  # model b's kernels with their HSIC statistics
    for lb in dict.fromkeys(lb for _, lb in wanted):
        L = kernel(fb, lb)
        s = _stats(L)
        held[lb.name] = (L, s, _hsic(s, s, float((L * L).sum(dtype=torch.float64))))
    out = []
    for la in dict.fromkeys(la for la, _ in wanted):
        K = kernel(fa, la)
        sk = _stats(K)
        kk = _hsic(sk, sk, float((K * K).sum(dtype=torch.float64)))
        for la2, lb in wanted:
            if la2 is not la:
                continue
            L, sl, ll = held[lb.name]
            kl = _hsic(sk, sl, float((K * L).sum(dtype=torch.float64)))
            value = kl / (kk * ll) ** 0.5 if kk > 0 and ll > 0 else float("nan")
            out.append((la, lb, value, {}))
    return table_rows(out)


@register_similarity("grelu_cka")
def grelu_cka_similarity(
    pair, pairs: str = "all", rows: int = ROWS, channel_chunk: int = 8, dtype: str = "float32"
):
    """G_ReLU-CKA (max-over-channels kernel, unbiased HSIC) at every layer pair."""
    return _cka_table(pair, "grelu", pairs, rows, channel_chunk, dtype)


@register_similarity("linear_cka")
def linear_cka_similarity(pair, pairs: str = "all", rows: int = ROWS, dtype: str = "float32"):
    """Textbook linear CKA (mean-centred features, unbiased HSIC) at every layer pair."""
    return _cka_table(pair, "linear", pairs, rows, 0, dtype)


@register_similarity("ortho_cka")
def ortho_cka_similarity(pair, pairs: str = "all", rows: int = ROWS, dtype: str = "float32"):
    """The paper's "orthogonal" CKA: linear kernel of per-channel standardised features."""
    return _cka_table(pair, "ortho", pairs, rows, 0, dtype)
