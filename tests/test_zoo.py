"""The zoo: vectorised training equals separate runs, checkpoints are selected on validation,
a killed or stopped (SIGTERM) job resumes bit-identically, features are streamed to HDF5 and equal
a hook reference."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import io
from pipeline.config import expand_runs
from pipeline.models import build, neuron_structure
from pipeline.modelsym.features import FeatureFile, extract_features
from pipeline.modelsym.members import load_member, read_member, select_checkpoint
from pipeline.modelsym.probes import activation_layers
from pipeline.modelsym.zoo import train_zoo
from pipeline.train.engine import ResumeStore, TrainingDiverged
from pipeline.train.loop import train_run

STUDY = {
    "kind": "train",
    "dataset": {"name": "digits", "val_fraction": 0.2},
    "model": {"name": "conv", "channels": 4, "pool": True},
    "train": {
        "optimizer": "adam",
        "lr": 0.02,
        "wd": 1e-3,
        "batch_size": 64,
        "epochs": 3,
        "dtype": "float64",
        "augment": True,
    },
}


def hparams(**changes):
    study = {**STUDY, **changes}
    return expand_runs("z", study)[0].hparams


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    out = tmp_path_factory.mktemp("zoo")
    summary = train_zoo(out, hparams(), [3, 8])
    return out, summary


def test_vectorised_members_follow_their_separate_runs(zoo, tmp_path):
    out, _ = zoo
    history = pd.read_parquet(out / "history.parquet")
    for seed in (3, 8):
        run = tmp_path / f"run{seed}"
        train_run(run, {**hparams(), "seed": seed}, progress=False)
        ref = pd.read_parquet(run / "history.parquet")
        ref = ref[ref.split != "train"]
        ours = history[(history.seed == seed) & (history.split != "train")]
        joined = ours.merge(ref, on=["epoch", "split"], suffixes=("", "_ref"))
        assert len(joined) == 6  # 3 epochs x (val, test)
        np.testing.assert_allclose(joined.loss, joined.loss_ref, rtol=1e-9)
        np.testing.assert_array_equal(joined.accuracy, joined.accuracy_ref)
        member = read_member(out / f"seed~{seed}.pt")
        manifest = io.read_json(run / "checkpoints.json")
        (entry,) = [e for e in manifest if e["step"] == member["step"]]
        weights = io.load_torch(run / entry["file"])["model"]
        assert max((weights[k] - v).abs().max().item() for k, v in member["model"].items()) < 1e-9


def test_checkpoints_are_selected_on_validation(zoo):
    out, summary = zoo
    history = pd.read_parquet(out / "history.parquet")
    for seed in (3, 8):
        val = history[(history.seed == seed) & (history.split == "val")].sort_values("epoch")
        best = int(val.epoch.iloc[int(np.argmax(val.accuracy.to_numpy()))])
        member = read_member(out / f"seed~{seed}.pt")
        assert member["epoch"] == best == summary["members"][str(seed)]["epoch"]
        assert member["metrics"]["val_accuracy"] == pytest.approx(val.accuracy.max())
        test = history[(history.seed == seed) & (history.split == "test")]
        assert member["metrics"]["test_accuracy"] == pytest.approx(
            float(test[test.epoch == best].accuracy.iloc[0])
        )
        model, record = load_member(out / f"seed~{seed}.pt")
        assert record["hparams"]["seed"] == seed and not model.training


class Kill:
    def on_epoch_end(self, run):
        if run.epoch == 2:
            raise KeyboardInterrupt


def test_killed_zoo_resumes_bit_identically(zoo, tmp_path):
    out, _ = zoo
    with pytest.raises(KeyboardInterrupt):
        train_zoo(tmp_path, hparams(), [3, 8], callbacks=(Kill(),))
    assert not (tmp_path / "seed~3.pt").exists()
    train_zoo(tmp_path, hparams(), [3, 8])
    for seed in (3, 8):
        a, b = read_member(out / f"seed~{seed}.pt"), read_member(tmp_path / f"seed~{seed}.pt")
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "history.parquet"), pd.read_parquet(tmp_path / "history.parquet")
    )


STOPPABLE = """
import json, sys
from pipeline.modelsym.zoo import train_zoo

class Announce:  # tells the test an epoch ended, so it signals a job in progress
    def on_epoch_end(self, run):
        print(f"epoch {run.epoch}", flush=True)

train_zoo(sys.argv[1], json.load(open(sys.argv[2])), [3, 8], callbacks=(Announce(),))
"""


def test_sigterm_stops_a_zoo_job_that_resumes_bit_identically(zoo, tmp_path):
    """SIGTERM mid-run: the job saves its state at the batch it reached and exits with an error
    naming the signal; the resumed job's members and history equal the uninterrupted job's."""
    out, _ = zoo
    hp_file = tmp_path / "hp.json"
    hp_file.write_text(json.dumps(hparams()))
    job = tmp_path / "job"
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPABLE, str(job), str(hp_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.strip() == "epoch 1":
            proc.send_signal(signal.SIGTERM)
            break
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 1 and re.search(r"TrainingStopped: stopped by SIGTERM", err), err
    state = io.load_torch(ResumeStore(job / ".resume").files()[-1])
    assert state["epoch"] == 1 or (state["epoch"], state["batch"]) == (2, 0)  # during epoch 2
    assert not (job / "seed~3.pt").exists()
    train_zoo(job, hparams(), [3, 8])
    for seed in (3, 8):
        a, b = read_member(out / f"seed~{seed}.pt"), read_member(job / f"seed~{seed}.pt")
        assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    pd.testing.assert_frame_equal(
        pd.read_parquet(out / "history.parquet"), pd.read_parquet(job / "history.parquet")
    )


@pytest.mark.parametrize(
    "model,message",
    [
        ({"name": "mlp", "widths": [8], "batch_norm": True}, "BatchNorm"),
        ({"name": "mlp", "widths": [8], "dropout": 0.5}, "dropout"),
    ],
)
def test_unvectorisable_models_are_refused(tmp_path, model, message):
    with pytest.raises(ValueError, match=message):
        train_zoo(tmp_path, hparams(model=model), [0, 1])


def test_zoo_needs_a_validation_split(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        train_zoo(tmp_path, hparams(dataset={"name": "digits", "val_fraction": 0.0}), [0])


def test_a_diverging_zoo_stops_with_an_error_naming_its_seeds(tmp_path):
    study = {
        **STUDY,
        "model": {"name": "mlp", "widths": [8]},
        "train": {"optimizer": "sgd", "lr": 1e6, "loss": "mse", "epochs": 2},
    }
    with pytest.raises(TrainingDiverged, match=r"in epoch 0 for seeds \[5, 2\]; lower train.lr"):
        train_zoo(tmp_path, expand_runs("nan", study)[0].hparams, [5, 2])
    assert not list(tmp_path.glob("seed~*.pt"))


def test_select_checkpoint_of_a_batch_norm_run(tmp_path):
    study = {
        **STUDY,
        "model": {"name": "mlp", "widths": [8], "batch_norm": True},
        "train": {**STUDY["train"], "epochs": 3, "augment": False, "lr": 0.05},
    }
    run = expand_runs("bn", study)[0]
    train_run(tmp_path / "run", run.hparams, progress=False)
    entry = select_checkpoint(tmp_path / "run", tmp_path / "member.pt")
    manifest = io.read_json(tmp_path / "run" / "checkpoints.json")
    scored = [e for e in manifest if "val_accuracy" in e["metrics"]]
    assert entry["metrics"]["val_accuracy"] == max(e["metrics"]["val_accuracy"] for e in scored)
    member = read_member(tmp_path / "member.pt")
    assert member["epoch"] == entry["epoch"]
    with pytest.raises(ValueError, match="only val_"):
        select_checkpoint(tmp_path / "run", tmp_path / "m2.pt", metric="test_accuracy")


def test_features_equal_forward_hooks_and_stream_in_blocks(zoo, tmp_path):
    out, _ = zoo
    path = extract_features(out / "seed~3.pt", tmp_path / "f.h5", size=100, batch_size=32)
    model, record = load_member(out / "seed~3.pt")
    layers = activation_layers(model)
    ff = FeatureFile(path)
    assert (
        [layer.name for layer in ff.layers] == [layer.name for layer in layers] == ["act1", "act2"]
    )
    from pipeline.modelsym.members import member_data

    data = member_data(record, "unused", dtype=torch.float64)
    x, y = next(data.test.eval_batches(100))
    seen = {}
    hooks = [
        model.get_submodule(layer.module).register_forward_hook(
            lambda m, i, o, name=layer.name: seen.__setitem__(name, o)
        )
        for layer in layers
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    np.testing.assert_array_equal(ff.labels(), y.numpy())
    for layer in layers:
        stored = ff.read(layer.name)
        np.testing.assert_allclose(
            stored.numpy(), seen[layer.name].float().double().numpy(), rtol=0, atol=0
        )
        blocks = list(ff.blocks(layer.name, rows=7))
        assert [s for s, _ in blocks] == list(range(0, 100, 7))
        assert torch.equal(torch.cat([b for _, b in blocks]), stored)


def test_probe_layers_of_the_paper_models():
    myrtle = build("myrtle", (3, 32, 32), 10, {"width": 4})
    assert [layer.index for layer in activation_layers(myrtle)] == [3, 6, 10, 14]  # mCNN
    r18 = activation_layers(build("resnet18", (3, 32, 32), 10, {"stem": "cifar"}))
    assert len(r18) == 17 and r18[1].name == "layer1_0_relu" and r18[2].name == "layer1_0_relu_1"
    assert [layer.after_add for layer in r18[1:5]] == [False, True, False, True]
    model = build("resnet20_option_a", (3, 16, 16), 10, {"width": 1})
    r20 = activation_layers(model)
    assert len(r20) == 19 and r20[0].index == 3 and r20[1].label.endswith("*")
    assert sum(p.numel() for p in model.parameters()) == 269_722  # He et al.'s 0.27M (option A)
    assert neuron_structure(model, (3, 16, 16)).group("layer1.residual").size == 16


def test_option_a_resnet_trains_and_exposes_features(tmp_path):
    study = {
        **STUDY,
        "dataset": {"name": "digits", "val_fraction": 0.2, "subset": 128},
        "model": {"name": "resnet20_option_a"},
        "train": {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "batch_size": 32, "epochs": 2},
    }
    run = expand_runs("a", study)[0]
    summary = train_run(tmp_path / "run", run.hparams, progress=False)
    assert summary["status"] == "completed"
    select_checkpoint(tmp_path / "run", tmp_path / "member.pt")
    ff = FeatureFile(extract_features(tmp_path / "member.pt", tmp_path / "f.h5", size=40))
    assert len(ff.layers) == 19 and len(ff) == 40
    assert ff.shapes["layer3_2_act2"] == (40, 64, 2, 2)
    assert ff.shapes["layer2_0_act1"] == (40, 32, 4, 4)


def test_sample_pairs_is_seeded_and_never_pairs_a_member_with_itself():
    from pipeline.modelsym import sample_pairs

    pairs = sample_pairs(range(10), 32, seed=1)
    assert pairs == sample_pairs(range(10), 32, seed=1) != sample_pairs(range(10), 32, seed=2)
    assert len(pairs) == 32 and all(a != b for a, b in pairs)
    assert len({m for p in pairs for m in p}) == 10  # 32 shuffles reach every member


@pytest.mark.parametrize("draw", range(10))
def test_sample_pairs_are_distinct_in_either_order(draw):
    """(0, 1) and (1, 0) are one pair: a zoo of n members gives at most n (n - 1) / 2 pairs."""
    import random

    from pipeline.modelsym import sample_pairs

    rng = random.Random(draw)
    n = rng.randint(2, 7)
    seeds = rng.sample(range(100), n)
    count = rng.randint(1, 30)
    pairs = sample_pairs(seeds, count, seed=draw)
    unordered = {frozenset(p) for p in pairs}
    assert len(unordered) == len(pairs) == min(count, n * (n - 1) // 2)
    assert all(len(p) == 2 for p in unordered)
    with pytest.raises(ValueError, match="at least 2"):
        sample_pairs([3], 1)
