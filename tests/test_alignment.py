"""Alignment measures: each equals a naive reference written here on small random data, keeps
its invariances, and gives the same numbers streamed from a feature file in small row blocks."""

from __future__ import annotations

import inspect
import itertools
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples

from pipeline.modelsym.cka import cka, hsic1, kernel_of
from pipeline.modelsym.features import write_feature_file
from pipeline.modelsym.procrustes import grelu_procrustes, ortho_procrustes
from pipeline.modelsym.similarity import Pair, compare, register_similarity

GEN = torch.Generator().manual_seed(0)


def relu_features(n=9, c=5, spatial=(2, 3), dead=(), gen=GEN):
    x = torch.relu(torch.randn(n, c, *spatial, generator=gen, dtype=torch.float64) + 0.3)
    for d in dead:
        x[:, d] = 0
    return x


def grelu_transform(x, gen=GEN):
    """x -> x P D on the channel axis (random permutation, positive scales)."""
    c = x.shape[1]
    perm = torch.randperm(c, generator=gen)
    scales = torch.exp(torch.randn(c, generator=gen, dtype=torch.float64))
    return x[:, perm] * scales.reshape(1, -1, *[1] * (x.ndim - 2))


def orthogonal_transform(x, gen=GEN):
    c = x.shape[1]
    q, _ = torch.linalg.qr(torch.randn(c, c, generator=gen, dtype=torch.float64))
    return torch.einsum("oi,ni...->no...", q, x)


# -- naive references -----------------------------------------------------------------------------
def naive_grelu_procrustes(x, y):
    """Brute force over every channel permutation of explicitly normalised channels."""
    xs, ys = x.numpy(), y.numpy()
    c = xs.shape[1]

    def unit(a):
        out = np.zeros_like(a)
        for k in range(c):
            norm = np.sqrt((a[:, k] ** 2).sum())
            out[:, k] = a[:, k] / norm if norm > 0 else 0
        return out

    xh, yh = unit(xs), unit(ys)
    best = min(((xh - yh[:, list(p)]) ** 2).sum() for p in itertools.permutations(range(c)))
    return np.sqrt(best / (4 * c))


def naive_ortho_procrustes(x, y):
    """Solve min_Q |X^ Q - Y^|_F by the SVD of X^T Y and measure the residual."""
    X = x.numpy().transpose(0, *range(2, x.ndim), 1).reshape(-1, x.shape[1])
    Y = y.numpy().transpose(0, *range(2, y.ndim), 1).reshape(-1, y.shape[1])
    X, Y = X / np.linalg.norm(X), Y / np.linalg.norm(Y)
    u, _, vt = np.linalg.svd(X.T @ Y)
    return np.linalg.norm(X @ (u @ vt) - Y) / 2


def naive_grelu_kernel(x):
    """Per-sample loops: K_ij = max_c <h_ic, h_jc> after per-channel centring + normalising."""
    h = x.numpy().reshape(x.shape[0], x.shape[1], -1).copy()
    for c in range(h.shape[1]):
        h[:, c] -= h[:, c].mean()
        norm = np.sqrt((h[:, c] ** 2).sum())
        h[:, c] = h[:, c] / norm if norm > 0 else 0
    n = len(h)
    K = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            if i != j:
                K[i, j] = max(h[i, c] @ h[j, c] for c in range(h.shape[1]))
    return K


def naive_linear_kernel(x):
    f = x.numpy().reshape(len(x), -1)
    f = f - f.mean(0)
    K = f @ f.T
    np.fill_diagonal(K, 0)
    return K


def u_statistic_hsic(K, L):
    """HSIC as the degree-4 U-statistic (Song et al. 2012) by brute force over 4-tuples."""
    n = len(K)
    total = 0.0
    for idx in itertools.permutations(range(n), 4):
        for i, j, q, r in itertools.permutations(idx):
            total += K[i, j] * L[i, j] + K[i, j] * L[q, r] - 2 * K[i, j] * L[i, q]
    count = n * (n - 1) * (n - 2) * (n - 3)
    return total / (24 * count)


def naive_cka(K, L):
    return u_statistic_hsic(K, L) / np.sqrt(u_statistic_hsic(K, K) * u_statistic_hsic(L, L))


# -- equal to the references ----------------------------------------------------------------------
def test_grelu_procrustes_equals_brute_force_with_a_dead_channel():
    x, y = relu_features(dead=(2,)), relu_features()
    ours = grelu_procrustes(x, y, rows=4)
    assert ours == pytest.approx(naive_grelu_procrustes(x, y), abs=1e-12)
    assert 0 < ours < 1 / np.sqrt(2)


def test_ortho_procrustes_equals_svd_solution():
    x, y = relu_features(), relu_features()
    assert ortho_procrustes(x, y, rows=2) == pytest.approx(naive_ortho_procrustes(x, y), abs=1e-12)


def test_unbiased_hsic_equals_the_u_statistic():
    x, y = relu_features(n=8), relu_features(n=8, spatial=())
    K, L = naive_linear_kernel(x), naive_grelu_kernel(y)
    ours = hsic1(torch.from_numpy(K), torch.from_numpy(L))
    assert ours == pytest.approx(u_statistic_hsic(K, L), rel=1e-10, abs=1e-14)


@pytest.mark.parametrize("spatial", [(2, 3), ()])
def test_grelu_kernel_equals_per_sample_loop(spatial):
    x = relu_features(n=11, c=4, spatial=spatial, dead=(1,))
    ours = kernel_of(x, "grelu", rows=3, channel_chunk=3).numpy()
    np.testing.assert_allclose(ours, naive_grelu_kernel(x), atol=1e-12)


def test_cka_values_equal_naive_cka():
    x, y = relu_features(n=8), relu_features(n=8)
    for kind, naive in (("grelu", naive_grelu_kernel), ("linear", naive_linear_kernel)):
        ours = cka(kernel_of(x, kind, rows=3), kernel_of(y, kind, rows=5))
        assert ours == pytest.approx(naive_cka(naive(x), naive(y)), rel=1e-9), kind


# -- invariances ----------------------------------------------------------------------------------
def test_grelu_measures_are_invariant_to_permutation_times_positive_diagonal():
    x, y = relu_features(n=40, c=6), relu_features(n=40, c=6)
    y2 = grelu_transform(y)
    assert grelu_procrustes(x, y2) == pytest.approx(grelu_procrustes(x, y), abs=1e-12)
    assert grelu_procrustes(x, grelu_transform(x)) == pytest.approx(0.0, abs=1e-7)
    K = kernel_of(x, "grelu")
    assert cka(K, kernel_of(y2, "grelu")) == pytest.approx(cka(K, kernel_of(y, "grelu")), abs=1e-12)
    assert cka(K, kernel_of(grelu_transform(x), "grelu")) == pytest.approx(1.0, abs=1e-12)
    # ...but not to a general rotation of the channels
    assert abs(grelu_procrustes(x, orthogonal_transform(y)) - grelu_procrustes(x, y)) > 1e-3


def test_orthogonal_measures_are_invariant_to_rotations_and_linear_cka_to_scale():
    x, y = relu_features(n=40, c=6), relu_features(n=40, c=6)
    yq = orthogonal_transform(y)
    assert ortho_procrustes(x, yq) == pytest.approx(ortho_procrustes(x, y), abs=1e-10)
    assert ortho_procrustes(x, orthogonal_transform(x)) == pytest.approx(0.0, abs=1e-7)
    K = kernel_of(x, "linear")
    base = cka(K, kernel_of(y, "linear"))
    assert cka(K, kernel_of(yq, "linear")) == pytest.approx(base, abs=1e-12)
    assert cka(K, kernel_of(3.7 * y, "linear")) == pytest.approx(base, abs=1e-12)
    assert cka(K, kernel_of(2.5 * orthogonal_transform(x), "linear")) == pytest.approx(
        1.0, abs=1e-12
    )
    # G_ReLU-CKA is not rotation invariant
    Kg = kernel_of(x, "grelu")
    assert abs(cka(Kg, kernel_of(yq, "grelu")) - cka(Kg, kernel_of(y, "grelu"))) > 1e-3


# -- registered measures on feature files ---------------------------------------------------------
@pytest.fixture
def feature_pair(tmp_path):
    gen = torch.Generator().manual_seed(3)
    # feature files hold float32: compare with the float32-rounded values
    a, b = (
        {
            "conv": relu_features(12, 4, (3, 3), gen=gen).float().double(),
            "fc": relu_features(12, 5, (), gen=gen).float().double(),
        }
        for _ in range(2)
    )
    pa = write_feature_file(tmp_path / "a.h5", a)
    pb = write_feature_file(tmp_path / "b.h5", b)
    return Pair(features_a=pa, features_b=pb), a, b


def test_registered_measures_stream_the_same_numbers(feature_pair):
    pair, a, b = feature_pair
    assert set(register_similarity.names()) >= {
        "grelu_procrustes",
        "ortho_procrustes",
        "grelu_cka",
        "linear_cka",
        "ortho_cka",
        "weight_matching",
    }
    table = compare("grelu_procrustes", pair, {"rows": 5})
    assert list(table.layer_a) == ["conv", "fc"] and list(table.layer_b) == ["conv", "fc"]
    for row in table.itertuples():
        assert row.distance == pytest.approx(
            grelu_procrustes(a[row.layer_a], b[row.layer_b]), abs=1e-12
        )
        assert row.similarity == pytest.approx(1 - row.distance)
    table = compare("ortho_procrustes", pair, {"rows": 7})
    for row in table.itertuples():
        assert row.distance == pytest.approx(
            ortho_procrustes(a[row.layer_a], b[row.layer_b]), abs=1e-12
        )
    for metric, kind in (("grelu_cka", "grelu"), ("linear_cka", "linear"), ("ortho_cka", "ortho")):
        table = compare(metric, pair, {"rows": 5, "dtype": "float64"})
        assert len(table) == 4  # all layer pairs
        for row in table.itertuples():
            ref = cka(kernel_of(a[row.layer_a], kind), kernel_of(b[row.layer_b], kind))
            assert row.similarity == pytest.approx(ref, abs=1e-12), (metric, row.layer_a)
    diag = compare("grelu_cka", pair, {"pairs": "diagonal"})
    assert list(zip(diag.layer_a, diag.layer_b, strict=True)) == [("conv", "conv"), ("fc", "fc")]


@settings(max_examples=examples(ci=4, thorough=40), deadline=None)
@given(
    n=st.integers(20, 1200),
    channels=st.integers(1, 8),
    spatial=st.sampled_from([(), (3,), (2, 3)]),
    dead=st.booleans(),
    seed=st.integers(0, 2**31 - 1),
)
def test_cka_defaults_agree_with_float64_in_one_block(n, channels, spatial, dead, seed):
    """The default CKA settings (float32 kernels from 500-row blocks, float64 moments and sums)
    give the float64 one-block value: within 1.7e-8 on 150 such draws (below 20 samples the
    unbiased HSIC's terms cancel more: 1e-7 at 12), 9.4e-8 on the embedded default's trained
    features (297 samples), ~1e-9 relative at 5,000 samples (benchmarks/bench_alignment.py)."""
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, channels, *spatial, generator=gen)
    a = torch.relu(z + 0.3)
    b = torch.relu(0.6 * z + 0.8 * torch.randn(n, channels, *spatial, generator=gen) + 0.3)
    if dead:
        a[:, 0] = 0
    for metric in ("grelu_cka", "linear_cka", "ortho_cka"):
        defaults = inspect.signature(register_similarity.get(metric)).parameters
        assert (defaults["dtype"].default, defaults["rows"].default) == ("float32", 500), metric
    with tempfile.TemporaryDirectory() as tmp:
        pair = Pair(
            features_a=write_feature_file(Path(tmp) / "a.h5", {"x": a}),
            features_b=write_feature_file(Path(tmp) / "b.h5", {"x": b}),
        )
        for metric in ("grelu_cka", "linear_cka", "ortho_cka"):
            default = compare(metric, pair).similarity.iloc[0]
            exact = compare(metric, pair, {"dtype": "float64", "rows": 0}).similarity.iloc[0]
            assert abs(default - exact) <= 2e-7, (metric, default, exact)


def test_mismatched_probe_sets_are_refused(tmp_path):
    pa = write_feature_file(tmp_path / "a.h5", {"x": relu_features(8, 3, ())})
    pb = write_feature_file(tmp_path / "b.h5", {"x": relu_features(9, 3, ())})
    with pytest.raises(ValueError, match="same probe set"):
        compare("linear_cka", Pair(features_a=pa, features_b=pb))


def test_alignment_figures_draw_from_the_tables(feature_pair, tmp_path):
    """Each figure draws what its table holds: one panel per CKA metric (a matrix each), one
    Procrustes panel with a line per metric, and one barrier panel per split of the
    weight-matching rows (the other metrics' rows of a collected alignment table draw nothing,
    not an empty "nan" panel), with the two paths (as trained, matched) in each."""
    import pandas as pd
    from drawn import capture, check_drawn

    from pipeline.plots import register_figure

    pair, _, _ = feature_pair
    cka_tables = pd.concat([compare(m, pair) for m in ("grelu_cka", "linear_cka")])
    procrustes = pd.concat([compare(m, pair) for m in ("grelu_procrustes", "ortho_procrustes")])
    barrier = pd.DataFrame(
        {
            "metric": "weight_matching",
            "aligned": [False, False, True, True] * 2,
            "t": [0.0, 1.0] * 4,
            "split": ["test"] * 4 + ["train"] * 4,
            "loss": [0.1, 0.2, 0.1, 0.2] * 2,
            "loss_barrier": [0.5, 0.5, 0.0, 0.0] * 2,
        }
    )
    collected = pd.concat([cka_tables, procrustes, barrier], ignore_index=True)
    expected = {
        "similarity_matrix": (cka_tables, [("grelu_cka", 1), ("linear_cka", 1)], "images"),
        "procrustes_layers": (procrustes, [("Procrustes", 2)], "errorbars"),
        "weight_matching_barrier": (collected, [("test", 2), ("train", 2)], "lines"),
    }
    for kind, (frame, panels, what) in expected.items():
        pdf, png = tmp_path / f"{kind}.pdf", tmp_path / f"{kind}.png"
        with capture() as figs:
            register_figure.get(kind)({"table": frame}, {}, pdf, png)
        assert pdf.read_bytes()[:4] == b"%PDF" and png.read_bytes()[:4] == b"\x89PNG"
        drawn = check_drawn(figs[0])
        assert len(drawn) == len(panels), (kind, [p.title for p in drawn])
        for p, (title, count) in zip(drawn, panels, strict=True):
            assert p.title.startswith(title), (kind, p.title)
            assert getattr(p, what) == count, (kind, p)
    no_matching = collected[collected.metric != "weight_matching"]
    with pytest.raises(ValueError, match="no weight_matching rows"):
        register_figure.get("weight_matching_barrier")(
            {"table": no_matching}, {}, tmp_path / "x.pdf", tmp_path / "x.png"
        )


def test_collect_tables_concatenates_pairs(feature_pair, tmp_path):
    import pandas as pd

    from pipeline.modelsym.similarity import collect_tables

    pair, _, _ = feature_pair
    paths = []
    for i, metric in enumerate(("grelu_procrustes", "linear_cka")):
        paths.append(tmp_path / f"{i}.parquet")
        compare(metric, pair).to_parquet(paths[-1])
    collect_tables(paths, tmp_path / "all.parquet")
    table = pd.read_parquet(tmp_path / "all.parquet")
    assert list(table.metric.value_counts().sort_index()) == [2, 4]
