"""The teleportation experiments' central numbers: micro-teleports at 90 +- 0.25 degrees to the
gradient on ReLU networks (not on tanh ones), interpolation endpoints unchanged by teleporting,
gradient/weight-norm changes growing with the CoB range, weight densities, the Figure 6 table
(diverged runs included), and every figure drawn from its table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from drawn import capture, check_drawn

from pipeline import io
from pipeline.data import load
from pipeline.models import build, neuron_structure
from pipeline.plots import register_figure
from pipeline.teleport.cob import sample
from pipeline.teleport.histograms import weight_histograms
from pipeline.teleport.interpolation import interpolate_cob, interpolation_profile
from pipeline.teleport.micro import micro_teleport_angles
from pipeline.teleport.statistics import teleport_statistics
from pipeline.teleport.validation import COLUMNS, validation_table
from pipeline.train.optim import loss_fn

CE = loss_fn("ce")


#: Small tensors: one torch thread, as every pipeline job uses (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def digits():
    return load("digits", "data", dtype=torch.float64)


def _batches(data, n=3, size=64):
    return list(data.train.train_batches(size, True, 0, 0))[:n]


def _draw(kind, table, tmp_path, spec=None):
    """Draw figure ``kind``; its panels (each draws finite data, no nan title or label)."""
    pdf, png = tmp_path / f"{kind}.pdf", tmp_path / f"{kind}.png"
    with capture() as figs:
        register_figure.get(kind)({"table": table}, spec or {}, pdf, png)
    assert pdf.stat().st_size > 1000 and png.stat().st_size > 1000
    return check_drawn(figs[0])


def test_micro_teleport_is_orthogonal_to_the_gradient(digits, tmp_path):
    """P = 2410 parameters: random directions spread by ~1/sqrt(P) rad = 1.2 degrees, the
    micro-teleport stays within 90 +- 0.25 degrees of the gradient on ReLU networks (with and
    without BatchNorm), and leaves that window on a tanh network (not a symmetry there)."""
    tables = []
    for act, opts in (("relu", {}), ("relu", {"batch_norm": True}), ("tanh", {})):
        model = build(
            "mlp",
            digits.input_shape,
            10,
            {"widths": [32], "activation": act, **opts},
            dtype=torch.float64,
        ).train()
        df = micro_teleport_angles(
            model, _batches(digits), CE, iterations=30, input_shape=digits.input_shape
        )
        deviation = (df.angle - 90).abs().groupby(df.pair).max()
        if act == "relu":
            assert deviation["gradient_vs_teleport"] < 0.25, deviation
        else:
            assert deviation["gradient_vs_teleport"] > 0.25, deviation
        for pair in ("gradient_vs_random", "teleport_vs_random", "random_vs_random"):
            assert deviation[pair] > 0.5, deviation
        tables.append(df.assign(model=f"mlp-{act}{'-bn' if opts else ''}"))
    _draw("micro_teleport", pd.concat(tables), tmp_path)


def test_micro_teleport_controls_are_drawn_per_batch_size():
    """Every (model, batch size) of a micro-teleport study draws its own CoBs and random
    vectors: the random-vs-random angles differ between batch sizes (they were one stream)."""
    from pipeline.teleport.tables import micro_table

    spec = {"models": [{"name": "mlp", "widths": [8]}], "batch_sizes": [8, 16], "iterations": 3}
    table = micro_table(spec, "data", seed=0)
    rand = table[table.pair == "random_vs_random"].pivot(
        index="iteration", columns="batch_size", values="cosine"
    )
    assert rand.shape == (3, 2) and (rand[8] != rand[16]).all()
    again = micro_table(spec, "data", seed=0)
    pd.testing.assert_frame_equal(table, again)  # and reproducible


def test_interpolation_endpoints_and_log_cob_path(digits, tmp_path):
    splits = {"train": digits.train, "val": digits.val}
    shape = digits.input_shape
    for act, sampling in (("relu", "intra_landscape"), ("tanh", "inter_landscape")):
        opts = {"widths": [24, 24], "activation": act}
        model = build("mlp", shape, 10, opts, seed=0, dtype=torch.float64)
        state_b = build("mlp", shape, 10, opts, seed=1, dtype=torch.float64).state_dict()
        alphas = [-0.5, 0.0, 0.25, 0.5, 1.0, 1.5]
        plain = interpolation_profile(model, model.state_dict(), state_b, shape, splits, CE, alphas)
        tele = interpolation_profile(
            model,
            model.state_dict(),
            state_b,
            shape,
            splits,
            CE,
            alphas,
            teleport=True,
            sampling=sampling,
            seed=3,
        )
        assert np.isfinite(tele.loss).all()
        ends = plain.alpha.isin([0.0, 1.0])
        assert np.allclose(tele.loss[ends], plain.loss[ends], rtol=1e-10, atol=0)
        assert np.array_equal(tele.accuracy[ends], plain.accuracy[ends])
        inside = plain.alpha.isin([0.25, 0.5])
        assert (tele.loss[inside] - plain.loss[inside]).abs().max() > 1e-3
    _draw("teleport_interpolation", pd.concat([plain, tele]), tmp_path)
    structure = neuron_structure(model, shape)
    gen = torch.Generator().manual_seed(0)
    a = sample(structure, "inter_landscape", 0.9, gen)
    b = sample(structure, "inter_landscape", 0.9, gen)
    for alpha, end in ((0.0, a), (1.0, b)):
        mid = interpolate_cob(a, b, alpha)
        assert all(torch.allclose(mid.tau[k], end.tau[k], rtol=1e-12) for k in a.tau)
    half = interpolate_cob(a, b, 0.5).tau["fc1"]
    assert torch.allclose(half.abs(), (a.tau["fc1"] * b.tau["fc1"]).abs().sqrt())
    assert (half.abs() >= 0.1).all()  # never through zero


def test_statistics_grow_with_the_cob_range(digits, tmp_path):
    model = build(
        "mlp",
        digits.input_shape,
        10,
        {"widths": [32, 32], "activation": "tanh", "batch_norm": True},
        dtype=torch.float64,
    )
    df = teleport_statistics(
        model, digits.input_shape, _batches(digits, 2), CE, cob_ranges=[0.01, 0.5, 0.9], teleports=4
    )
    mean = df.groupby("cob_range").ratio_change.mean()
    assert mean[0.01] < mean[0.5] < mean[0.9]
    ratio = (df.grad_norm / df.weight_norm).mean()
    assert mean[0.01] < 0.05 * ratio < mean[0.9]
    _draw("teleport_statistics", df.assign(model="mlp"), tmp_path)


def test_weight_histograms(tmp_path):
    model = build("mlp", (1, 8, 8), 10, {"widths": [300, 300]}, seed=0)
    df = weight_histograms(model, (1, 8, 8), cob_range=0.9, bins=400)
    width = df.right - df.left
    mass = (df.density * width).groupby([df.kind, df.layer]).sum()
    assert np.allclose(mass, 1.0, atol=1e-9)

    def spread(kind, layer="fc2.weight"):
        r = df[(df.kind == kind) & (df.layer == layer)]
        centre = (r.left + r.right) / 2
        p = r.density * (r.right - r.left)
        return float(np.sqrt((p * centre**2).sum() - (p * centre).sum() ** 2))

    def distance(k1, k2, layer="fc2.weight"):
        a = df[(df.kind == k1) & (df.layer == layer)].reset_index()
        b = df[(df.kind == k2) & (df.layer == layer)].reset_index()
        return float((np.abs(a.density - b.density) * (a.right - a.left)).sum())

    assert spread("teleported") > 1.2 * spread("init")
    assert distance("same_distribution", "teleported") < 0.1 < distance("init", "teleported")
    _draw("weight_histograms", df, tmp_path, {"layers": ["all", "fc2.weight"]})


def _fake_run(root, mode, momentum, lr, seed, accuracies, status="completed", epochs=4):
    io.write_json(
        root / "hparams.json",
        {
            "model": {"name": "mlp"},
            "dataset": {"name": "digits"},
            "seed": seed,
            "train": {"lr": lr, "momentum": momentum, "epochs": epochs},
            "teleport": {"mode": mode},
        },
    )
    io.write_json(root / "summary.json", {"status": status})
    rows = [(0, "val", 2.3, 0.1)] + [(e + 1, "val", 1.0, a) for e, a in enumerate(accuracies)]
    rows += [(e + 1, "train", 1.0, 0.5) for e in range(len(accuracies))]
    history = pd.DataFrame(rows, columns=["epoch", "split", "loss", "accuracy"])
    history["split"] = pd.Categorical(history.split, ["train", "val", "test"])
    io.write_parquet(root / "history.parquet", history)


def test_validation_table_and_figure(tmp_path):
    runs = {}
    for mode in ("none", "teleport"):
        for momentum in (0.0, 0.9):
            for lr in (0.1, 0.01):
                for seed in (0, 1):
                    name = f"model~mlp5/teleport~{mode}/momentum~{momentum}/lr~{lr}/seed~{seed}"
                    root = tmp_path / name
                    diverged = mode == "teleport" and lr == 0.1 and seed == 1
                    acc = [0.5, 0.7] if diverged else [0.5, 0.7, 0.8, 0.85 + 0.01 * seed]
                    _fake_run(
                        root, mode, momentum, lr, seed, acc, "diverged" if diverged else "completed"
                    )
                    runs[name] = root
    table = validation_table(runs)
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == 16 * 4
    assert set(table.method) == {
        "Standard SGD",
        "Teleported SGD",
        "Standard SGD with momentum",
        "Teleported SGD with momentum",
    }
    assert set(table.model) == {"mlp5"} and set(table.split) == {"val"}
    div = table[table.diverged]
    assert len(div) == 4 and set(div.epoch) == {3, 4} and div.accuracy.isna().all()
    assert not table[~table.diverged].accuracy.isna().any()
    row = table[(table.run == next(iter(runs))) & (table.epoch == 4)].iloc[0]
    assert row.accuracy == 0.85 and row.method == "Standard SGD" and row.lr == 0.1
    _draw("teleport_validation", table, tmp_path, {"box_epochs": [2, 4]})
    bad = tmp_path / "bad"
    _fake_run(bad, "sideways", 0.0, 0.1, 0, [0.5])
    with pytest.raises(ValueError, match="teleport.mode 'sideways' not allowed"):
        validation_table({"bad": bad})


def test_config_level_tables(tmp_path):
    """The entry points the workflow rules call, on default-config sizes (digits)."""
    from pipeline.config import expand_runs
    from pipeline.teleport.tables import (
        histogram_table,
        interpolation_table,
        micro_table,
        statistics_table,
    )
    from pipeline.train.loop import train_run

    models = [
        {"name": "mlp", "widths": [32], "label": "mlp32"},
        {"name": "conv", "channels": 4, "pool": True},
    ]
    micro = micro_table({"models": models, "batch_sizes": [8], "iterations": 5}, "data")
    assert set(micro.model) == {"mlp32", "conv"} and set(micro.batch_size) == {8}
    assert (micro[micro.pair == "gradient_vs_teleport"].angle - 90).abs().max() < 0.25
    random = micro_table(
        {"models": models[:1], "batch_sizes": [8], "iterations": 3, "inputs": "random"}, "data"
    )
    assert not np.allclose(random.angle, micro[micro.model == "mlp32"].angle[:12])
    stats = statistics_table(
        {"models": models, "batches": 1, "teleports": 2, "cob_ranges": [0.1, 0.9]}, "data"
    )
    assert len(stats) == 2 * 2 * 2 and set(stats.model) == {"mlp32", "conv"}
    hist = histogram_table({"model": models[0], "bins": 50}, "data")
    assert set(hist.kind) == {"init", "teleported", "same_distribution"}
    study = {
        "kind": "train",
        "dataset": {"name": "digits"},
        "model": {"name": "mlp", "widths": [16]},
        "train": {"lr": 0.05, "momentum": 0.9, "epochs": 1},
        "sweep": {"batch_size": [16, 128]},
    }
    roots = []
    for run in expand_runs("t", study):
        roots.append(tmp_path / run.name)
        train_run(roots[-1], run.hparams, progress=False)
    path = interpolation_table(*roots, {"alphas": [0.0, 0.5, 1.0]}, "data")
    assert set(path.split) == {"train", "val", "test"} and set(path.teleported) == {False, True}
    ends = path[path.alpha.isin([0.0, 1.0])].sort_values(["split", "alpha", "teleported"])
    assert np.allclose(ends.loss.to_numpy()[::2], ends.loss.to_numpy()[1::2], rtol=1e-5)
