"""Weight matching recovers a planted permutation exactly, through the neuron structure of
registered models; the loss barrier vanishes between a member and its aligned permuted copy."""

from __future__ import annotations

import pytest
import torch

from pipeline.config import expand_runs
from pipeline.data import load
from pipeline.models import build, neuron_structure
from pipeline.modelsym.matching import barriers, interpolation_curve, weight_matching
from pipeline.modelsym.members import read_member, save_member
from pipeline.modelsym.similarity import Pair, compare
from pipeline.modelsym.zoo import train_zoo
from pipeline.symmetry.actions import permute, random_element

MODELS = [
    ("mlp", (1, 8, 8), {"widths": [12, 10]}),
    ("conv", (1, 8, 8), {"channels": 6, "pool": True}),
    ("myrtle", (3, 16, 16), {"width": 4}),
    ("resnet20", (3, 8, 8), {}),
]


@pytest.mark.parametrize("name,shape,opts", MODELS, ids=[m[0] for m in MODELS])
def test_weight_matching_recovers_planted_permutation(name, shape, opts):
    model = build(name, shape, 10, opts, seed=1, dtype=torch.float64)
    structure = neuron_structure(model, shape)
    with torch.no_grad():  # non-trivial BN statistics and affine parameters
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 1.5)
    planted = random_element(structure, torch.Generator().manual_seed(2)).perms
    state_a = model.state_dict()
    state_b = permute(state_a, structure, planted)
    found = weight_matching(state_a, state_b, structure, seed=0)
    assert set(found) <= set(planted) and found  # groups tied to others have no own entry
    for group, perm in found.items():
        # permute(B, found) = A  <=>  found = planted^-1
        assert torch.equal(perm, torch.argsort(planted[group])), group
    assert any(not torch.equal(p, torch.arange(len(p))) for p in planted.values())
    realigned = permute(state_b, structure, found)
    assert (
        max(
            (realigned[k] - v).abs().max().item()
            for k, v in state_a.items()
            if v.is_floating_point()
        )
        == 0.0
    )


def test_weight_matching_recovers_a_planted_permutation_of_option_a_streams():
    """Option-A ResNet: the stage-1 stream runs on inside stages 2 and 3 (zero-padded
    shortcuts); a planted permutation of every group is found again, and undoing it restores
    every parameter, the padded channels included."""
    from pipeline.modelsym.matching import structure_for

    shape = (3, 8, 8)
    model = build("resnet20_option_a", shape, 10, {}, seed=1, dtype=torch.float64)
    structure = structure_for(model, shape, "resnet20_option_a")
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.weight.uniform_(0.5, 1.5)
    planted = random_element(structure, torch.Generator().manual_seed(2)).perms
    state_a = model.state_dict()
    state_b = permute(state_a, structure, planted)
    # naive reference: the stage-1 permutation moves rows 8..23 of a stage-2 convolution (whose
    # columns follow the permutation of the conv1 before it)
    rows = state_a["layer2.2.conv2.weight"][8:24]
    expected = rows[planted["layer1.residual"]][:, planted["layer2.2.conv1"]]
    assert torch.equal(state_b["layer2.2.conv2.weight"][8:24], expected)
    found = weight_matching(state_a, state_b, structure, seed=0)
    assert set(found) == set(planted)
    for group, perm in found.items():
        assert torch.equal(perm, torch.argsort(planted[group])), group
    realigned = permute(state_b, structure, found)
    assert all(torch.equal(realigned[k], v) for k, v in state_a.items())


@pytest.fixture(scope="module")
def trained_member(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    study = {
        "kind": "train",
        "dataset": {"name": "digits", "val_fraction": 0.2},
        "model": {"name": "mlp", "widths": [24, 16]},
        "train": {
            "optimizer": "adam",
            "lr": 3e-3,
            "batch_size": 64,
            "epochs": 4,
            "dtype": "float64",
        },
    }
    train_zoo(out, expand_runs("m", study)[0].hparams, [4])
    return out / "seed~4.pt"


def test_barrier_vanishes_after_aligning_a_permuted_copy(trained_member, tmp_path):
    record = read_member(trained_member)
    model = build("mlp", (1, 8, 8), 10, {"widths": [24, 16]}, dtype=torch.float64)
    model.load_state_dict(record["model"])
    structure = neuron_structure(model, (1, 8, 8))
    planted = random_element(structure, torch.Generator().manual_seed(5)).perms
    permuted = permute(record["model"], structure, planted)
    copy = save_member(
        tmp_path / "b.pt",
        permuted,
        record["hparams"],
        record["info"],
        record["epoch"],
        record["step"],
        record["metrics"],
    )
    table = compare("weight_matching", Pair(trained_member, copy), {"points": 5})
    after = table[table.aligned].groupby("split").loss_barrier.first()
    before = table[~table.aligned].groupby("split").loss_barrier.first()
    assert (after.abs() < 1e-9).all(), after
    assert (before > 0.05).all(), before
    assert table.moved_fraction.iloc[0] > 0.5
    # the aligned path is flat: every t has the endpoint loss
    flat = table[table.aligned & (table.split == "test")].loss
    assert flat.max() - flat.min() < 1e-9


def test_barrier_of_a_known_curve():
    import pandas as pd

    curve = pd.DataFrame(
        {"t": [0.0, 0.5, 1.0], "split": "x", "loss": [1.0, 3.0, 2.0], "accuracy": [0.9, 0.5, 0.7]}
    )
    row = barriers(curve).iloc[0]
    assert row.loss_barrier == pytest.approx(3.0 - 1.5)
    assert row.accuracy_barrier == pytest.approx(0.8 - 0.5)


def test_batch_norm_interpolation_reestimates_statistics():
    data = load("digits", "unused", 0.1, dtype=torch.float64)
    model = build(
        "mlp", (1, 8, 8), 10, {"widths": [8], "batch_norm": True}, seed=0, dtype=torch.float64
    )
    state = model.state_dict()
    with pytest.raises(ValueError, match="bn_batches"):
        interpolation_curve(model, state, state, {"test": data.test}, [0.0, 1.0])

    def inputs():
        for x, _ in data.train.eval_batches(256):
            yield x

    curve = interpolation_curve(model, state, state, {"test": data.test}, [0.0, 0.5, 1.0], inputs)
    # statistics re-estimated from data, not the initial (0, 1): the loss differs from the
    # untouched model's, and is the same at every t of a constant path
    from pipeline.modelsym.matching import evaluate_model

    initial_loss, _ = evaluate_model(model, data.test)
    assert curve.loss.max() - curve.loss.min() < 1e-12
    assert abs(curve.loss.iloc[0] - initial_loss) > 1e-3
