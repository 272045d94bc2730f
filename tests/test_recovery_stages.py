"""The file-to-file stages (expand, cluster), a trained run as teacher probed on its dataset,
the students' lottery (exact per-student sparsity, rewinding to an epoch), and the figures."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import io
from pipeline.config import expand_runs
from pipeline.models import build
from pipeline.plots.recovery import (
    lottery,
    recovery_distances,
    recovery_family,
    recovery_losses,
    recovery_widths,
)
from pipeline.recovery.chain import forward, init_stack
from pipeline.recovery.lottery import student_lottery
from pipeline.recovery.plan import toy_family
from pipeline.recovery.students import ExpandHparams, FitHparams, fit, student_chain
from pipeline.recovery.study import collect_tables, load_network, run_cluster, run_expand
from pipeline.recovery.teachers import (
    ToyTeacher,
    load_run_teacher,
    make_toy_teacher,
    probe_dataset,
    probe_distribution,
)
from pipeline.train.loop import train_run
from pipeline.train.pruning import LotteryHparams, remaining_after

TEACHER = {
    "kind": "toy",
    "input_dim": 4,
    "widths": [3],
    "activation": "relu",
    "min_angle": 30.0,
    "min_outgoing": 0.5,
    "seed": 2,
}
PROBE = {"inputs": "gaussian", "n": 400, "n_test": 400, "seed": 1}
EXPAND = {
    "students": 6,
    "rho": 4,
    "seed": 0,
    "fit": {
        "lr": 1e-2,
        "batch_size": 0,
        "max_epochs": 1500,
        "plateau_patience": 50,
        "plateau_cooldown": 50,
        "min_lr": 1e-6,
        "log_every": 250,
    },
}
CLUSTER = {"final": {"optimizer": "lbfgs", "lr": 1.0, "max_epochs": 40, "log_every": 10}}


def test_expand_then_cluster_writes_the_tables(tmp_path):
    torch.set_num_threads(1)
    summary = run_expand(tmp_path / "expand", TEACHER, PROBE, EXPAND)
    assert summary["students"] == 6 and len(summary["status"]) == 6
    table = run_cluster(tmp_path / "cluster", tmp_path / "expand", PROBE, CLUSTER, "toy")
    assert table.recovered.all() and (table.inferred_width == 3).all()
    chain, params, _ = load_network(tmp_path / "cluster" / "reconstruction.pt")
    teacher, t_params, _ = load_network(tmp_path / "expand" / "teacher.pt")
    x = torch.randn(100, 4, dtype=torch.float64)
    assert torch.allclose(forward(chain, params, x), forward(teacher, t_params, x), atol=1e-6)
    neurons = io.read_parquet(tmp_path / "cluster" / "neurons.parquet", ("d_w", "d_a", "kind"))
    clusters = io.read_parquet(tmp_path / "cluster" / "clusters.parquet", ("status", "size"))
    # every clustered student's 12 neurons (those within cluster.converged of the best)
    assert 4 <= table.clustered_students.iloc[0] <= 6
    assert clusters["size"].sum() == table.clustered_students.iloc[0] * 12
    both = collect_tables([tmp_path / "cluster" / "recovery.parquet"] * 2, tmp_path / "all.pq")
    assert len(both) == 2 * len(table) and io.read_parquet(tmp_path / "all.pq").equals(both)
    history = io.read_parquet(
        tmp_path / "expand" / "students_history.parquet",
        ("epoch", "student", "loss", "test_loss", "stage"),
    )
    assert set(history.student) == set(range(6))
    for kind, frame, name in (
        (recovery_distances, neurons, "distances"),
        (recovery_widths, table, "widths"),
        (recovery_losses, history, "losses"),
    ):
        kind({"table": frame}, {}, tmp_path / f"{name}.pdf", tmp_path / f"{name}.png")
        assert (tmp_path / f"{name}.png").stat().st_size > 1000


def test_a_trained_run_is_a_teacher_probed_on_its_dataset(tmp_path):
    torch.set_num_threads(1)
    study = {
        "kind": "train",
        "dataset": {"name": "digits", "val_fraction": 0.0},
        "model": {"name": "mlp", "widths": [12], "activation": "tanh"},
        "train": {
            "optimizer": "adam",
            "lr": 0.01,
            "batch_size": 100,
            "epochs": 1,
            "dtype": "float64",
        },
    }
    hparams = {**expand_runs("t", study)[0].hparams, "seed": 1}
    train_run(tmp_path / "run", hparams, progress=False)
    chain, params = load_run_teacher(tmp_path / "run", (1, 8, 8), 10)
    assert chain.widths == (12,) and chain.input_dim == 64 and chain.activation == "tanh"
    data = probe_dataset(chain, params, "digits", tmp_path, noise=0.0)
    model = build("mlp", (1, 8, 8), 10, {"widths": [12], "activation": "tanh"}, 0, torch.float64)
    model.load_state_dict(io.load_torch(tmp_path / "run" / "final.pt")["model"])
    assert torch.allclose(data.y, model(data.x.reshape(-1, 1, 8, 8)), atol=1e-12)
    assert len(data.x_test) == 297
    # digits' corner pixels are always blank: not identifiable, masked out
    assert not data.informative[0] and data.informative.sum() < 64
    noisy = probe_dataset(chain, params, "digits", tmp_path, noise=0.1, seed=3)
    assert noisy.informative.all()


def test_student_lottery_masks_and_rewinds():
    torch.set_num_threads(1)
    teacher, t_params = make_toy_teacher(ToyTeacher(3, (2,), "tanh", seed=1))
    data = probe_distribution(teacher, t_params, 200, 100, seed=0)
    expand = ExpandHparams(
        students=3,
        rho=4,
        seed=0,
        fit=FitHparams(lr=1e-2, batch_size=50, max_epochs=6, plateau_patience=10**6, log_every=3),
    )
    h = LotteryHparams(strategy="fc19", fraction=0.4, levels=2, rewind_step=2)
    table = student_lottery(teacher, data, expand, h)
    chain = student_chain(teacher, 4)
    hidden = 8 * 3 + 0  # fc1.weight per student
    out = 1 * 8
    for level in range(3):
        rows = table[table.level == level]
        assert len(rows) == 3
        pruned = (hidden - remaining_after(hidden, 0.4, level)) + (
            out - remaining_after(out, 0.2, level)
        )
        np.testing.assert_allclose(rows.sparsity, pruned / (hidden + out))
    # the weights kept at epoch 2 are those of a run of exactly 2 epochs
    params = init_stack(chain, 3, 0)
    long = fit(chain, params, data, expand.fit, 0, tag="students", keep_epoch=2)
    short = fit(
        chain,
        params,
        data,
        FitHparams(**{**expand.fit.__dict__, "max_epochs": 2}),
        0,
        tag="students",
    )
    assert all(torch.equal(long.kept[k], short.params[k]) for k in short.params)


def test_toy_family_configs_and_figures(tmp_path):
    family = toy_family(12, seed=0)
    assert len(family) == 12 and len({v["seed"] for v in family.values()}) == 12
    assert {v["activation"] for v in family.values()} == {"relu", "tanh", "sigmoid"}
    assert all(2 <= v["input_dim"] <= 10 and 3 <= v["widths"][0] <= 8 for v in family.values())
    assert toy_family(12, seed=0) == family
    table = pd.DataFrame(
        {
            "problem": ["a", "b", "c"],
            "max_d_w": [1e-9, 0.3, 0.0],
            "teacher_width": [3, 4, 5],
            "inferred_width": [3, 5, 5],
            "recovered": [True, False, True],
        }
    )
    recovery_family({"table": table}, {}, tmp_path / "f.pdf", tmp_path / "f.png")
    levels = pd.DataFrame(
        {
            "strategy": ["sparse_global"] * 3 + ["han"] * 3,
            "sparsity": [0.0, 0.2, 0.36] * 2,
            "test_accuracy": [0.9, 0.91, 0.88, 0.9, 0.85, 0.8],
            "test_loss": [0.3, 0.28, 0.35, 0.3, 0.4, 0.5],
        }
    )
    lottery({"table": levels}, {}, tmp_path / "l.pdf", tmp_path / "l.png")
    assert (tmp_path / "f.png").stat().st_size > 1000 and (tmp_path / "l.pdf").is_file()
    with pytest.raises(KeyError, match="lacks columns"):
        lottery(
            {"table": levels.drop(columns="test_loss")}, {}, tmp_path / "x.pdf", tmp_path / "x.png"
        )
