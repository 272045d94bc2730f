"""Functional modularity found by weight masks on networks trained by the pipeline.

- addition/multiplication: an MLP trained to >= 95% on both operations; masks for ``add`` and
  ``mul`` (and ``add`` again with another data order). Inverse-mask policy for the input and
  output layers: ``ones`` (left whole: both operations read the same digits and write the same
  output digits, so only the hidden weights can tell them apart; inverting the input layer too
  removes the digit detectors both operations read). Removing the add mask's hidden weights
  must hurt addition at least 3x more than multiplication, and vice versa; the add and mul masks'
  hidden-layer IoU must be below that of the two add masks.
- double addition: a network of two disjoint halves (block-diagonal weights, one half per pair)
  built from a pipeline-trained one; the two pairs' masks share no weight at all.

Mask settings: a few hundred steps; a strong regulariser (alpha 3e-3) and mask learning rate
(3e-2) make up for the paper's 20,000 steps at alpha 1e-4, lr 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from pipeline.config import expand_runs
from pipeline.masks import evaluate, overlap
from pipeline.masks.layers import masked_layers, masked_params, param_roles
from pipeline.masks.sampling import binary
from pipeline.masks.study import load_trained
from pipeline.masks.train import MaskHparams, train_mask
from pipeline.masks.views import subtask_view
from pipeline.models import build
from pipeline.train.loop import train_run

#: Small tensors: one torch thread, as every pipeline job uses (tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


MASKS = MaskHparams(steps=300, lr=0.03, alpha=3e-3, samples=4, batch_size=128, log_every=100)


def _train(root, dataset, model, train):
    study = {
        "kind": "train",
        "dataset": {"name": dataset, "val_fraction": 0.0},
        "model": model,
        "train": {"optimizer": "adam", **train},
        "checkpoints": {"step0": False, "epoch_end": False},
    }
    train_run(root, expand_runs("t", study)[0].hparams, progress=False)
    return load_trained(root)


def _hidden_iou(a, b, layers):
    table = overlap.overlap(a, b, layers)
    return table[(table.kind == "role") & (table.layer == "hidden")].iou.item()


@pytest.fixture(scope="module")
def addmul(tmp_path_factory):
    trained = _train(
        tmp_path_factory.mktemp("addmul") / "run",
        "addmul",
        {"name": "mlp", "widths": [384, 384], "dropout": 0.1},
        {"lr": 0.003, "batch_size": 32, "epochs": 25},
    )
    params = masked_params(trained.layers)
    masks = {}
    for name, sub, seed in [("add", "add", 1), ("mul", "mul", 1), ("add_order2", "add", 2)]:
        view = subtask_view(trained.splits, "addmul", sub)
        masks[name] = binary(train_mask(trained.model, params, view, MASKS, seed=seed).logits)
    views = {s: subtask_view(trained.splits, "addmul", s, "test") for s in ("add", "mul")}
    return trained, masks, views


@pytest.mark.slow
def test_addmul_inverse_masks_specialise(addmul):
    trained, masks, views = addmul
    unmasked = evaluate.masked_accuracy(trained.model, {"none": None}, views)
    assert (unmasked.accuracy >= 0.95).all(), unmasked
    inv = evaluate.inverse_test(
        trained.model,
        {"add": masks["add"], "mul": masks["mul"]},
        views,
        param_roles(trained.layers),
        "ones",
    ).set_index(["mask", "view"])
    drop = inv["drop"]
    assert drop["add", "add"] >= 3 * drop["add", "mul"], inv
    assert drop["mul", "mul"] >= 3 * drop["mul", "add"], inv
    # each mask alone still solves its own operation and not the other
    own = evaluate.masked_accuracy(trained.model, masks, views).set_index(["mask", "view"])
    assert own.accuracy["add", "add"] > 0.9 and own.accuracy["mul", "mul"] > 0.8, own
    assert own.accuracy["add", "mul"] < 0.1 and own.accuracy["mul", "add"] < 0.1, own


@pytest.mark.slow
def test_addmul_hidden_iou_below_data_order_iou(addmul):
    trained, masks, _ = addmul
    across = _hidden_iou(masks["add"], masks["mul"], trained.layers)
    same = _hidden_iou(masks["add"], masks["add_order2"], trained.layers)
    assert across < same, (across, same)
    assert across < 0.5 * same, (across, same)


def _block_diagonal(model, hidden):
    """Two copies of a double-addition MLP side by side: copy 1 reads pair 1's inputs and writes
    pair 1's outputs, copy 2 pair 2's; every weight between the copies is zero."""
    src = dict(model.named_parameters())
    wide = build("mlp", (80,), 40, {"widths": [2 * h for h in hidden]})
    with torch.no_grad():
        for p in wide.parameters():
            p.zero_()
        dst = dict(wide.named_parameters())
        h1 = hidden[0]
        dst["fc1.weight"][:h1, :40] = src["fc1.weight"][:, :40]
        dst["fc1.weight"][h1:, 40:] = src["fc1.weight"][:, 40:]
        for name in ("fc1", "fc2"):
            h = src[f"{name}.bias"].shape[0]
            dst[f"{name}.bias"][:h] = dst[f"{name}.bias"][h:] = src[f"{name}.bias"]
        h2 = hidden[1]
        dst["fc2.weight"][:h2, :h1] = dst["fc2.weight"][h2:, h1:] = src["fc2.weight"]
        dst["out.weight"][:20, :h2] = src["out.weight"][:20]
        dst["out.weight"][20:, h2:] = src["out.weight"][20:]
        dst["out.bias"][:] = src["out.bias"]
    return wide.eval()


def test_disjoint_halves_give_disjoint_masks(tmp_path):
    hidden = [48, 48]
    trained = _train(
        tmp_path / "run",
        "double_add",
        {"name": "mlp", "widths": hidden},
        {"lr": 0.005, "batch_size": 64, "epochs": 10},
    )
    wide = _block_diagonal(trained.model, hidden)
    views = {p: subtask_view(trained.splits, "double_add", p, "test") for p in ("pair1", "pair2")}
    for view in views.values():  # the wide network computes what the trained one does
        assert evaluate.score(wide, None, view)["accuracy"] == pytest.approx(
            evaluate.score(trained.model, None, view)["accuracy"]
        )
        assert evaluate.score(wide, None, view)["accuracy"] > 0.9
    layers = masked_layers(wide, (80,))
    h = MaskHparams(steps=300, lr=0.01, alpha=3e-4, batch_size=128, log_every=100)
    masks = {
        p: binary(
            train_mask(
                wide, masked_params(layers), subtask_view(trained.splits, "double_add", p), h
            ).logits
        )
        for p in views
    }
    table = overlap.overlap(masks["pair1"], masks["pair2"], layers)
    assert (table.intersection == 0).all(), table  # hidden, input and output layers alike
    assert table[(table.kind == "role") & (table.layer == "hidden")].union.item() > 0
    for p, view in views.items():  # the masks are not empty: each still solves its pair
        assert evaluate.score(wide, masks[p], view)["accuracy"] > 0.9
