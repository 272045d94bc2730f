"""Lottery-ticket pruning: masks have exactly the requested sparsity and remove the smallest
weights; rewinding restores the stated step's weights; pruned weights stay zero."""

from __future__ import annotations

import math

import pytest
import torch

from pipeline import io
from pipeline.config import expand_runs
from pipeline.pruning.lottery import run_lottery, train_masked
from pipeline.train.loop import train_run
from pipeline.train.pruning import (
    LotteryHparams,
    apply,
    ones_mask,
    prunable_names,
    prune,
    remaining_after,
    sparsity,
)


def weights(seed=0, stacked=0):
    gen = torch.Generator().manual_seed(seed)
    lead = (stacked,) if stacked else ()
    state = {
        "fc1.weight": torch.randn(*lead, 30, 17, generator=gen),
        "fc1.bias": torch.randn(*lead, 30, generator=gen),
        "fc2.weight": torch.randn(*lead, 20, 30, generator=gen),
        "out.weight": torch.randn(*lead, 10, 20, generator=gen),
    }
    # ties: repeated magnitudes must not change the count
    state["fc2.weight"].view(-1)[:50] = 0.25
    return state


@pytest.mark.parametrize("strategy", ["sparse_global", "han"])
def test_global_levels_have_exact_counts_and_remove_the_smallest(strategy):
    state = weights()
    names = prunable_names(state)
    assert names == ["fc1.weight", "fc2.weight", "out.weight"]
    total = sum(state[k].numel() for k in names)
    mask = ones_mask(state, names)
    for level in range(1, 6):
        previous = mask
        mask = prune(apply(state, mask), mask, strategy, 0.2)
        assert sum(int(m.sum()) for m in mask.values()) == remaining_after(total, 0.2, level)
        assert sparsity(mask) == pytest.approx(1 - remaining_after(total, 0.2, level) / total)
        assert all((m <= previous[k]).all() for k, m in mask.items())  # nothing regrows
        # every removed weight is no larger than every kept one (naive reference)
        removed = torch.cat([state[k][previous[k] & ~mask[k]].abs() for k in names])
        kept = torch.cat([state[k][mask[k]].abs() for k in names])
        assert removed.max() <= kept.min()


def test_fc19_prunes_the_output_layer_at_half_rate():
    state = weights(1)
    names = prunable_names(state)
    mask = ones_mask(state, names)
    hidden = state["fc1.weight"].numel() + state["fc2.weight"].numel()
    out = state["out.weight"].numel()
    for level in range(1, 4):
        mask = prune(apply(state, mask), mask, "fc19", 0.2, output="out.weight")
        assert int(mask["out.weight"].sum()) == remaining_after(out, 0.1, level)
        assert int(mask["fc1.weight"].sum() + mask["fc2.weight"].sum()) == remaining_after(
            hidden, 0.2, level
        )
    with pytest.raises(KeyError, match="output"):
        prune(state, mask, "fc19", 0.2, output=None)
    with pytest.raises(ValueError, match="allowed"):
        prune(state, mask, "magnitude", 0.2)


def test_stacked_masks_give_every_model_the_sparsity_or_rank_jointly():
    state = weights(2, stacked=4)
    names = prunable_names(state, stacked=True)
    per_model = sum(state[k][0].numel() for k in names)
    mask = ones_mask(state, names)
    for level in range(1, 4):
        mask = prune(apply(state, mask), mask, "sparse_global", 0.3, stacked=True)
        left = remaining_after(per_model, 0.3, level)
        assert torch.equal(
            sum(m.reshape(4, -1).sum(1) for m in mask.values()), torch.full((4,), left)
        )
        assert torch.allclose(
            sparsity(mask, stacked=True),
            torch.full((4,), 1 - left / per_model, dtype=torch.float64),
        )
    # joint ranking (the published students' behaviour): the total is exact, models differ
    state[next(iter(names))][0] *= 10  # model 0's first layer is large: it keeps more
    joint = prune(state, ones_mask(state, names), "sparse_global", 0.3, stacked=True, joint=True)
    kept = sum(m.reshape(4, -1).sum(1) for m in joint.values())
    assert int(kept.sum()) == 4 * per_model - math.ceil(0.3 * 4 * per_model)
    assert kept[0] > kept[1:].max()


STUDY = {
    "kind": "train",
    "dataset": {"name": "digits", "val_fraction": 0.1},
    "model": {"name": "mlp", "widths": [24]},
    "train": {"optimizer": "adam", "lr": 0.01, "batch_size": 100, "epochs": 2, "dtype": "float64"},
    "checkpoints": {"every_steps": 5},
}


@pytest.fixture(scope="module")
def digits_hparams():
    return {**expand_runs("p", STUDY)[0].hparams, "seed": 3}


def test_rewinding_restores_the_stated_step_and_masks_stay(tmp_path, digits_hparams):
    """The published rule (OpenLTH, the spec): sparse_global leaves the output layer out by
    default; it trains, unpruned, at every level."""
    torch.set_num_threads(1)
    h = LotteryHparams(strategy="sparse_global", fraction=0.5, levels=2, rewind_step=5)
    assert not h.prune_output
    table = run_lottery(tmp_path / "lot", digits_hparams, h)
    # theta_5 is the ordinary run's checkpoint at step 5, bit for bit
    train_run(tmp_path / "run", digits_hparams, progress=False)
    step5 = io.load_torch(tmp_path / "run" / "checkpoints" / "step000000005.pt")["model"]
    rewind = io.load_torch(tmp_path / "lot" / "rewind.pt")["model"]
    assert all(torch.equal(rewind[k], step5[k]) for k in step5)
    # level 0 is the unpruned run: the same final weights as train_run
    final0 = io.load_torch(tmp_path / "lot" / "level~0" / "final.pt")["model"]
    ref = io.load_torch(tmp_path / "run" / "final.pt")["model"]
    assert all(torch.equal(final0[k], ref[k]) for k in ref)
    hidden = [k for k in ref if k.endswith("weight") and k != "out.weight"]
    weights_total = sum(ref[k].numel() for k in hidden)
    for level in (1, 2):
        mask = io.load_torch(tmp_path / "lot" / f"level~{level}" / "mask.pt")["mask"]
        final = io.load_torch(tmp_path / "lot" / f"level~{level}" / "final.pt")["model"]
        assert sorted(mask) == sorted(hidden)
        assert (final["out.weight"] != 0).all()
        assert sum(int(m.sum()) for m in mask.values()) == remaining_after(
            weights_total, 0.5, level
        )
        for k, m in mask.items():
            assert (final[k][~m] == 0).all()  # pruned weights stayed zero through retraining
            assert (final[k][m] != rewind[k][m]).any()  # and the rest trained
    assert list(table.level) == [0, 1, 2]
    assert table.sparsity.tolist() == pytest.approx(
        [1 - remaining_after(weights_total, 0.5, lv) / weights_total for lv in range(3)]
    )
    # a re-run finds every level finished and trains nothing
    again = run_lottery(tmp_path / "lot", digits_hparams, h)
    assert again.equals(table)


def test_han_continues_from_the_trained_weights(tmp_path, digits_hparams):
    torch.set_num_threads(1)
    h = LotteryHparams(strategy="han", fraction=0.5, levels=1)
    table = run_lottery(tmp_path / "han", digits_hparams, h)
    final0 = io.load_torch(tmp_path / "han" / "level~0" / "final.pt")["model"]
    final1 = io.load_torch(tmp_path / "han" / "level~1" / "final.pt")["model"]
    mask = io.load_torch(tmp_path / "han" / "level~1" / "mask.pt")["mask"]
    # the kept half is the larger half of the trained weights
    kept = torch.cat([final0[k][m].abs() for k, m in mask.items()])
    removed = torch.cat([final0[k][~m].abs() for k, m in mask.items()])
    assert removed.max() <= kept.min()
    # level 1 is training from the pruned trained weights (no rewind), step 0 on
    ref, _, _ = train_masked(digits_hparams, apply(final0, mask), mask, 0)
    assert all(torch.equal(ref[k], final1[k]) for k in ref)
    total = sum(final0[k].numel() for k in mask)
    assert table.loc[1, "sparsity"] == pytest.approx(1 - remaining_after(total, 0.5, 1) / total)
    assert table.loc[1, "sparsity"] == pytest.approx(sparsity(mask), rel=1e-15)


def test_a_level_whose_epoch_has_no_batch_is_an_error(digits_hparams):
    """A batch larger than the training split (drop_last): an error, not an endless loop."""
    from pipeline.models import build

    hp = {**digits_hparams, "train": {**digits_hparams["train"], "batch_size": 5000}}
    state = build("mlp", (1, 8, 8), 10, {"widths": [24]}, 3, torch.float64).state_dict()
    with pytest.raises(ValueError, match="an epoch has no batches"):
        train_masked(hp, state, {}, 0)
