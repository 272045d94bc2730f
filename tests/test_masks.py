"""Weight masks: sampling statistics, the batched forward against a naive per-sample loop, mask set
arithmetic against hand counts, the arithmetic task tables, transfer freezing, and the study
functions end to end on a tiny digits run."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
from drawn import capture, check_drawn
from torch.func import functional_call

from pipeline.config import ConfigError, expand_runs
from pipeline.data import load
from pipeline.data.tasks import IGNORE, addmul_table, double_add_table, pixel_permutation, subtask
from pipeline.masks import evaluate, overlap, removal, study
from pipeline.masks.batched import model_weights, sampled_outputs
from pipeline.masks.layers import MaskedLayer, masked_layers, masked_params
from pipeline.masks.sampling import binary, logistic_noise, sample, sample_masked
from pipeline.masks.train import MaskHparams, train_mask
from pipeline.masks.transfer import permuted_transfer
from pipeline.masks.views import subtask_view
from pipeline.models import build
from pipeline.plots import register_figure
from pipeline.train.engine import TrainingDiverged
from pipeline.train.loop import train_run

#: Small tensors: one torch thread, as every pipeline job uses (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


# -- sampling -------------------------------------------------------------------------------
def test_keep_rate_is_sigmoid_of_logit():
    logits = torch.linspace(-3, 3, 13)
    n = 40_000
    masks = sample(logits, n, torch.Generator().manual_seed(0))
    rate = masks.mean(0)
    p = torch.sigmoid(logits)
    err = (rate - p).abs()
    bound = 4 * torch.sqrt(p * (1 - p) / n)  # 4 standard errors per logit
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    assert bool((err <= bound).all()), (err / torch.sqrt(p * (1 - p) / n)).tolist()


def test_straight_through_gradient_is_that_of_the_soft_sample():
    logits = torch.tensor([-1.0, 0.0, 0.5, 2.0], requires_grad=True)
    m = sample(logits, 5, torch.Generator().manual_seed(3))
    m.sum().backward()
    noise = logistic_noise((5, 4), torch.Generator().manual_seed(3), logits.detach())
    soft = torch.sigmoid(logits.detach() + noise)
    assert torch.equal(m.detach(), (soft > 0.5).float())
    assert torch.allclose(logits.grad, (soft * (1 - soft)).sum(0), atol=1e-6)


def test_fused_masked_sample_equals_weight_times_sample():
    gen = torch.Generator().manual_seed(4)
    weight = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    logits = torch.randn(6, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    probe = torch.randn(3, 6, 5, generator=gen, dtype=torch.float64)
    fused = sample_masked(weight, logits, 3, torch.Generator().manual_seed(9))
    g_fused = torch.autograd.grad((fused * probe).sum(), (weight, logits))
    plain = weight * sample(logits, 3, torch.Generator().manual_seed(9))
    g_plain = torch.autograd.grad((plain * probe).sum(), (weight, logits))
    assert torch.equal(fused.detach(), plain.detach()) and 0 < (fused != 0).sum() < fused.numel()
    for a, b in zip(g_fused, g_plain, strict=True):
        assert torch.allclose(a, b, atol=1e-12) and a.abs().sum() > 0
    weight = weight.detach()
    # a transposed incoming gradient (what a Linear's batched backward hands back) is the same
    out = sample_masked(weight, logits, 3, torch.Generator().manual_seed(9))
    (g_t,) = torch.autograd.grad(out, logits, probe.transpose(1, 2).contiguous().transpose(1, 2))
    assert torch.allclose(g_t, g_plain[1], atol=1e-12)


def test_binary_mask_is_positive_logit():
    masks = binary({"w": torch.tensor([-0.1, 0.0, 0.1])})
    assert masks["w"].tolist() == [False, False, True]


# -- batched forward ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,shape,opts",
    [
        ("mlp", (1, 8, 8), {"widths": [12, 10], "batch_norm": True, "dropout": 0.3}),
        ("modules_cnn", (1, 8, 8), {"width": 0.25}),
    ],
)
def test_batched_samples_equal_sequential_masked_passes(name, shape, opts):
    model = build(name, shape, 10, opts, seed=1, dtype=torch.float64).eval()
    for mod in model.modules():
        if isinstance(mod, torch.nn.BatchNorm1d):
            mod.running_mean.uniform_(-1, 1)
            mod.running_var.uniform_(0.5, 2)
    weights = model_weights(model)
    params = masked_params(masked_layers(model, shape))
    gen = torch.Generator().manual_seed(0)
    logits = {
        n: torch.randn(weights[n].shape, generator=gen, dtype=torch.float64).requires_grad_(True)
        for n in params
    }
    k, x = 4, torch.randn(12, *shape, generator=gen, dtype=torch.float64)
    samples = {
        n: sample(lg, k, torch.Generator().manual_seed(i))
        for i, (n, lg) in enumerate(logits.items())
    }
    batched = sampled_outputs(model, weights, samples, x)
    grads_batched = torch.autograd.grad(
        batched.square().sum(), list(logits.values()), retain_graph=True
    )
    naive = []
    for j in range(k):  # block j of 3 examples under sample j, one plain call each
        params_j = {n: w * samples[n][j] if n in samples else w for n, w in weights.items()}
        naive.append(functional_call(model, params_j, (x[3 * j : 3 * j + 3],)))
    naive = torch.cat(naive)
    grads_naive = torch.autograd.grad(naive.square().sum(), list(logits.values()))
    assert torch.allclose(batched, naive, atol=1e-12)
    for a, b in zip(grads_batched, grads_naive, strict=True):
        assert torch.allclose(a, b, atol=1e-10)


def test_layer_roles_from_structure():
    model = build("mlp", (42,), 20, {"widths": [8, 8]})
    layers = masked_layers(model, (42,), biases=True)
    assert [(la.name, la.role) for la in layers] == [
        ("fc1", "input"),
        ("fc2", "hidden"),
        ("out", "output"),
    ]
    assert layers[1].params == ("fc2.weight", "fc2.bias")


# -- set arithmetic -------------------------------------------------------------------------
LAYERS = [MaskedLayer("a", ("a.weight",), "input"), MaskedLayer("b", ("b.weight",), "hidden")]


def _mask(a, b):
    return {
        "a.weight": torch.tensor(a, dtype=torch.bool),
        "b.weight": torch.tensor(b, dtype=torch.bool),
    }


MASKS = {
    "x": _mask([1, 1, 0, 0], [1, 1, 1, 1, 0, 0]),
    "y": _mask([1, 0, 1, 0], [0, 0, 1, 1, 1, 0]),
    "z": _mask([0, 0, 0, 1], [0, 0, 0, 0, 0, 0]),
}


def _row(frame, **where):
    sel = frame
    for k, v in where.items():
        sel = sel[sel[k] == v]
    assert len(sel) == 1, where
    return sel.iloc[0]


def test_sharing_counts():
    table = overlap.sharing(MASKS, LAYERS)
    # x: layer a keeps {0,1}, others keep {0,2,3} -> 1 of 2; layer b keeps {0..3}, y keeps {2,3,4}
    assert _row(table, mask="x", layer="a").sharing == 0.5
    assert _row(table, mask="x", layer="b").sharing == 0.5
    assert _row(table, mask="x", layer="total").sharing == 3 / 6
    assert _row(table, mask="y", layer="total").sharing == (1 + 2) / (2 + 3)  # a: {0}; b: {2,3}
    assert math.isnan(_row(table, mask="z", layer="b").sharing)  # empty mask


def test_iou_iomin_remaining_transfer():
    table = overlap.overlap(MASKS["x"], MASKS["y"], LAYERS)
    b = _row(table, layer="b")
    assert (b.intersection, b.union, b.iou, b.iomin) == (2, 5, 0.4, 2 / 3)
    assert _row(table, layer="total").iou == 3 / 8
    assert _row(table, kind="role", layer="hidden").iou == 0.4
    rem = overlap.remaining(MASKS, "x", LAYERS)
    assert _row(rem, mask="y", layer="total").remaining == 3 / 6
    tr = overlap.transfer_sharing(MASKS, LAYERS)
    assert _row(tr, mask="y", layer="total").sharing == 3 / 5
    assert _row(tr, mask="z", layer="a").sharing == 0.0  # {3} is in neither x nor y


def test_inverse_policies_and_half_subsets():
    roles = {"a.weight": "input", "b.weight": "hidden"}
    m = MASKS["x"]
    inv = evaluate.inverse(m, roles, "invert")
    assert torch.equal(inv["a.weight"], ~m["a.weight"])
    ones = evaluate.inverse(m, roles, "ones")
    assert bool(ones["a.weight"].all()) and torch.equal(ones["b.weight"], ~m["b.weight"])
    ref = evaluate.inverse(m, roles, "reference", MASKS["y"])
    assert torch.equal(ref["a.weight"], MASKS["y"]["a.weight"])
    with pytest.raises(ValueError, match="allowed: invert, ones, reference"):
        evaluate.inverse(m, roles, "keep")
    five = [MaskedLayer(f"l{i}", (f"l{i}.weight",), "hidden") for i in range(5)]
    subsets = evaluate.half_subsets(five, random_halves=5, seed=1)
    assert subsets["early"] == ["l0", "l1", "l2"] and subsets["late"] == ["l3", "l4"]
    randoms = [tuple(v) for k, v in subsets.items() if k.startswith("random") and "_" not in k]
    assert len(randoms) == len(set(randoms)) == 5 and all(len(r) == 3 for r in randoms)
    assert sorted(subsets["random0"] + subsets["random0_rest"]) == [f"l{i}" for i in range(5)]


def test_removal_drops_against_hand_numbers():
    ref = np.array([[0.8, 0.2, 0.0], [0.1, 0.9, 0.0], [0.0, 0.5, 0.5]])
    masked = np.array([[0.2, 0.8, 0.0], [0.1, 0.9, 0.0], [0.0, 0.6, 0.4]])
    row = removal.drops(ref, masked, 0)
    assert row["target_drop"] == pytest.approx(75.0)  # 0.8 -> 0.2
    assert row["largest_other_drop"] == pytest.approx(20.0) and row["worst_other"] == 2
    assert row["other_over_target"] == pytest.approx(20 / 75 * 100)
    conf = removal.confusion(torch.eye(3)[[0, 1, 1, 2]], torch.tensor([0, 1, 2, 2]), 3)
    assert conf.tolist() == [[1, 0, 0], [0, 1, 0], [0, 0.5, 0.5]]


# -- tasks ----------------------------------------------------------------------------------
def _decode(onehot):
    digits = onehot.reshape(len(onehot), -1, 10).argmax(-1)
    return digits[:, 0::2] + 10 * digits[:, 1::2]


def test_addmul_table_against_arithmetic():
    x, y = addmul_table()
    assert x.shape == (20000, 42) and y.shape == (20000, 2)
    numbers = _decode(x[:, :40])
    op = x[:, 40:].argmax(1)
    expected = np.where(op == 0, numbers[:, 0] + numbers[:, 1], numbers[:, 0] * numbers[:, 1])
    assert np.array_equal(y[:, 0] + 10 * y[:, 1], expected % 100)
    assert len({(*row,) for row in np.c_[numbers, op]}) == 20000
    assert x.sum(1).tolist() == [5] * 20000


def test_double_add_table_and_subtasks():
    x, y = double_add_table()
    first = y[:, 0] != IGNORE
    assert first.sum() == 10000 and np.all((y[:, 2] != IGNORE) == ~first)
    assert np.all(x[first, 40:] == 0) and np.all(x[~first, :40] == 0)
    pair = _decode(x[first, :40])
    assert np.array_equal(y[first, 0] + 10 * y[first, 1], pair.sum(1) % 100)
    data = load("double_add", "unused", 0.0)
    sel = subtask("double_add", "pair2").select(data.test.x, data.test.y)
    assert int(sel.sum()) == 10000 and bool((data.test.y[sel, 0] == IGNORE).all())
    add = subtask("addmul", "add").select(*(torch.as_tensor(a) for a in addmul_table()))
    assert int(add.sum()) == 10000
    with pytest.raises(ValueError, match="allowed: all, add, mul"):
        subtask("addmul", "sub")


def test_permuted_subtask_is_a_fixed_permutation():
    assert torch.equal(pixel_permutation(64, 0), torch.arange(64))
    p1 = pixel_permutation(64, 1)
    assert torch.equal(p1, pixel_permutation(64, 1)) and not torch.equal(p1, torch.arange(64))
    assert torch.equal(p1.sort().values, torch.arange(64))
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    out = subtask("digits", "permuted_1").transform(x)
    assert torch.equal(out.reshape(2, -1), x.reshape(2, -1)[:, p1])


# -- transfer -------------------------------------------------------------------------------
def test_transfer_freezes_used_weights_exactly():
    splits = load("digits", "unused", 0.0)

    def fresh(seed):
        return build("mlp", splits.input_shape, 10, {"widths": [24]}, seed)

    h = MaskHparams(steps=80, lr=0.02, alpha=1e-3, batch_size=64, log_every=40)
    masks, accuracy, sharing = permuted_transfer(
        fresh, splits, "digits", 2, h, seed=0, reset_first_layer=False
    )
    first = accuracy[accuracy.evaluated == 0].set_index("trained").accuracy
    assert first[0] > 0.5  # permutation 0 learned
    assert first[1] == first[0]  # its weights were frozen while permutation 1 trained
    assert set(masks) == {"permuted_0", "permuted_1"}
    # transfer sharing, counted by hand from the two masks: |m_1 & m_0| / |m_1|, per layer and
    # in total (the sums over every masked parameter)
    m0, m1 = masks["permuted_0"], masks["permuted_1"]
    both = {n: int((m1[n] & m0[n]).sum()) for n in m1}
    kept = {n: int(m1[n].sum()) for n in m1}
    total = _row(sharing, mask="permuted_1", layer="total")
    assert (total["count"], total.shared) == (sum(kept.values()), sum(both.values()))
    assert total.sharing == sum(both.values()) / sum(kept.values())
    for row in sharing[(sharing["mask"] == "permuted_1") & (sharing.kind == "layer")].itertuples():
        params = [n for n in m1 if n.rsplit(".", 1)[0] == row.layer]
        assert params and row.shared == sum(both[n] for n in params), row
        assert row.sharing == sum(both[n] for n in params) / sum(kept[n] for n in params)
    assert not (sharing["mask"] == "permuted_0").any()  # nothing before the first to share


@pytest.mark.parametrize("steps,log_every", [(10, 3), (4, 10)])
def test_a_non_finite_loss_stops_mask_training_at_its_check(steps, log_every):
    """The task loss is checked every ``log_every`` steps and at the last: with a NaN output
    bias (unmasked: a NaN loss at every step) training stops at the first check, naming the
    subtask."""
    splits = load("digits", "unused", 0.0)
    model = build("mlp", splits.input_shape, 10, {"widths": [8]}, 0)
    with torch.no_grad():
        model.out.bias[0] = math.nan
    params = masked_params(masked_layers(model, splits.input_shape))
    h = MaskHparams(steps=steps, batch_size=32, log_every=log_every)
    first = min(steps, log_every)
    with pytest.raises(TrainingDiverged, match=f"on 'all': the loss became nan by step {first};"):
        train_mask(model, params, subtask_view(splits, "digits", "all"), h)


# -- study functions end to end -------------------------------------------------------------
def test_study_stages_tables_and_figures(tmp_path):
    run = expand_runs(
        "t",
        {
            "kind": "train",
            "dataset": {"name": "digits", "val_fraction": 0.0},
            "model": {"name": "mlp", "widths": [32, 32]},
            "train": {"optimizer": "adam", "lr": 0.01, "epochs": 5, "batch_size": 32},
        },
    )[0]
    train_run(tmp_path / "run", run.hparams, progress=False)
    spec = {
        "hparams": {"steps": 60, "lr": 0.02, "alpha": 1e-3, "batch_size": 64, "log_every": 30},
        "stages": {
            "no3": {"subtask": "without_3", "keep_output": True},  # before its reference
            "verify": {"subtask": "all"},
            "verify_b": {"subtask": "all", "seed": 7},
            "no5": {"subtask": "without_5", "keep_output": True},
        },
        "reference": "verify",
        "evaluate_on": ["all"],
        "inverse": {"masks": ["no3"]},
        "sharing": ["no3", "no5"],
        "overlap": [["no3", "no5"]],
        "half_mask": {"random_halves": 2},
        "removal": True,
    }
    files = study.train_stages(tmp_path / "run", spec, tmp_path / "masks")
    assert list(files) == ["verify", "no3", "verify_b", "no5"]
    ref, no3 = study.read_masks(files["verify"]), study.read_masks(files["no3"])
    assert torch.equal(no3["out.weight"], ref["out.weight"])  # copied and frozen
    tables = study.analyse(tmp_path / "run", files, spec, tmp_path / "tables", run="seed~0")
    assert set(tables) == set(study.TABLES)
    for name in study.TABLES:
        assert (tmp_path / "tables" / f"{name}.parquet").is_file()
    acc = tables["accuracy"]
    assert _row(acc, mask="none", view="all").accuracy > 0.8
    drops = tables["class_drop"].set_index("removed")
    assert set(drops.index) == {3, 5} and drops.target_drop.notna().all()
    assert tables["stability"].a.tolist()[0] == "verify"
    assert (
        len(tables["half_mask"]) == 6
        and (tables["sharing"].network_size == 64 * 32 + 32 * 32 + 32 * 10).all()
    )
    both = study.collect([tmp_path / "tables/sharing.parquet"] * 2, tmp_path / "all.parquet")
    assert len(both) == 2 * len(tables["sharing"])
    history = study.mask_history(files)
    assert history.groupby("mask").step.max().tolist() == [60] * 4
    for kind, table in [
        ("mask_sharing", "sharing"),
        ("mask_iou", "overlap"),
        ("sharing_vs_size", "sharing"),
        ("confusion_difference", "confusion"),
    ]:
        pdf, png = tmp_path / f"{kind}.pdf", tmp_path / f"{kind}.png"
        with capture() as figs:
            register_figure.get(kind)(
                {"table": pd.read_parquet(tmp_path / "tables" / f"{table}.parquet")}, {}, pdf, png
            )
        assert pdf.stat().st_size > 1000 and png.stat().st_size > 1000
        check_drawn(figs[0])  # every panel draws finite data; no nan title or label
    with pytest.raises(ConfigError, match=r"masks\.hparams\.step: unknown key"):
        study.mask_hparams({"step": 3})
