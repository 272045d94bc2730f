"""The students' hand-written backpropagation (:class:`StackedMSE`) against autograd, on drawn
chains: depth, widths, activation, biases, skips, the number of networks, and both ways of
running a later layer (block-diagonal GEMM and batched matmul)."""

from __future__ import annotations

import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st
from strategies import examples

from pipeline.models.activations import NAMES
from pipeline.recovery.chain import Chain, StackedMSE, flatten, forward, init_stack, unflatten

F64 = torch.float64


@settings(max_examples=examples(ci=12, thorough=100))
@given(data=st.data())
def test_stacked_mse_gradient_equals_autograd(data):
    depth = data.draw(st.integers(1, 3), label="depth")
    widths = data.draw(st.lists(st.integers(1, 7), min_size=depth, max_size=depth), label="w")
    chain = Chain(
        data.draw(st.integers(1, 6), label="input"),
        widths,
        data.draw(st.integers(1, 3), label="outputs"),
        data.draw(st.sampled_from(sorted(NAMES)), label="activation"),
        data.draw(st.booleans(), label="bias"),
        data.draw(st.sets(st.integers(1, depth)), label="skips"),
    )
    n = data.draw(st.integers(1, 4), label="networks")
    seed = data.draw(st.integers(0, 2**16), label="seed")
    gen = torch.Generator().manual_seed(seed)
    params = init_stack(chain, n, seed, F64)
    params = {
        k: v + 0.3 * torch.randn(v.shape, generator=gen, dtype=F64) for k, v in params.items()
    }
    flat = flatten(chain, params)
    batch = data.draw(st.integers(1, 40), label="batch")
    x = torch.randn(batch, chain.input_dim, generator=gen, dtype=F64)
    y = torch.randn(batch, chain.outputs, generator=gen, dtype=F64)
    leaf = flat.clone().requires_grad_(True)
    ref = ((forward(chain, unflatten(chain, leaf), x) - y) ** 2).mean((1, 2))
    (ref_grad,) = torch.autograd.grad(ref.sum(), leaf)
    for block_diagonal_max in (0, 2**18):  # batched matmuls; block-diagonal GEMMs
        note(f"block_diagonal_max {block_diagonal_max}")
        per, grad = StackedMSE(chain, block_diagonal_max)(flat, x, y)
        torch.testing.assert_close(per, ref.detach(), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad, ref_grad, rtol=1e-11, atol=1e-13)
