"""Conservation laws (Kunin et al.) against their predictions, on the default config's study."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline import config as cfg
from pipeline.extract import extract_run
from pipeline.mechanics import theory
from pipeline.mechanics.cache import cache_metric
from pipeline.train.loop import train_run

ROOT = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(0)


# -- the filters against naive loops --------------------------------------------------------------
def test_discrete_momentum_matches_explicit_recursion():
    q0, jv = RNG.normal(size=5), RNG.normal(size=(60, 5))
    lr, wd, beta, d = 0.05, 0.01, 0.9, 0.1
    q, p, out = q0.copy(), np.zeros(5), [q0.copy()]
    for k in range(60):
        c = 1.0 if k == 0 else 1 - d
        r = beta * p + c * wd * q
        q, p = q - 2 * lr * r + lr**2 * jv[k], r - lr * jv[k]
        out.append(q.copy())
    assert np.allclose(theory.discrete_momentum(q0, jv, lr, wd, beta, d), out, rtol=1e-12)


def test_continuous_sgd_is_the_papers_sum():
    q0, ju = RNG.normal(size=3), RNG.normal(size=(40, 3))
    lr, wd = 0.1, 0.01
    n = np.arange(41)
    naive = np.array(
        [
            np.exp(-2 * wd * lr * m) * q0
            + lr**2 * sum(np.exp(-2 * wd * lr * (m - k)) * ju[k] for k in range(m))
            for m in n
        ]
    )
    assert np.allclose(theory.continuous_sgd(q0, ju, lr, wd), naive, rtol=1e-12)


@pytest.mark.parametrize("beta,wd", [(0.9, 1e-3), (0.5, 1e-4), (0.99, 1e-2)])
def test_oscillator_green_function_and_homogeneous_solution(beta, wd):
    lr = 0.1
    osc = theory.Oscillator(lr, beta, 0.0, 4 * wd / (lr * (1 + beta)))
    g, w2 = osc.gamma, osc.omega2
    t = osc.dt * np.arange(200)
    h = osc.homogeneous(199)
    # h solves x'' + 2 gamma x' + omega^2 x = 0 with x(0) = 1, x'(0) = 0 (central differences)
    dt = osc.dt
    residual = (
        (h[2:] - 2 * h[1:-1] + h[:-2]) / dt**2
        + 2 * g * (h[2:] - h[:-2]) / (2 * dt)
        + (w2 * h[1:-1])
    )
    assert h[0] == 1 and np.abs(residual).max() < 0.05 * max(w2, 2 * g, 1) * 10 * dt
    # the forced response of a unit impulse at step 0 is the Green's function G(t)
    impulse = np.zeros((199, 1))
    impulse[0] = 1
    green = osc.forced(impulse)[:, 0]
    disc = g**2 - w2
    s = np.sqrt(abs(disc))
    exact = (
        np.exp(-g * t) * np.sin(s * t) / s
        if disc < 0
        else (np.exp((-g + s) * t) - np.exp((-g - s) * t)) / (2 * s)
    )
    assert np.allclose(green, exact, rtol=1e-9, atol=1e-12)


# -- the default config's mechanics study ---------------------------------------------------------
@pytest.fixture(scope="module")
def default_mechanics(tmp_path_factory):
    study = cfg.load(ROOT / "config" / "config.yaml")["studies"]["mechanics"]
    assert study["train"]["dtype"] == "float64"
    out = tmp_path_factory.mktemp("mechanics")
    runs = []
    for run in cfg.expand_runs("mechanics", study):
        root = out / run.name
        train_run(root, run.hparams, progress=False)
        extract_run(root, out / f"{run.name}.h5")
        runs.append(
            {
                "name": run.name,
                "extract": out / f"{run.name}.h5",
                "run_dir": root,
                "trace": root / "trace.h5",
            }
        )
    summaries = {}
    for metric in ("translation", "scale", "rescale"):
        cache_metric(metric, runs, out / f"{metric}.parquet", out / f"{metric}.summary.parquet")
        summaries[metric] = pd.read_parquet(out / f"{metric}.summary.parquet")
    return pd.concat(summaries.values(), ignore_index=True)


def _dev(summary, run, quantity, which):
    rows = summary[(summary.run == run) & (summary.quantity == quantity)]
    assert len(rows), (run, quantity)
    return rows[f"max_rel_dev_{which}"].max()


SGD, SGD_EPS = "momentum~0.0/bn_eps~1e-12/seed~1", "momentum~0.0/bn_eps~1e-05/seed~1"
MOM, MOM_EPS = "momentum~0.9/bn_eps~1e-12/seed~1", "momentum~0.9/bn_eps~1e-05/seed~1"


@pytest.mark.parametrize("quantity", ["translation", "scale", "rescale"])
def test_sgd_predictions(default_mechanics, quantity):
    assert _dev(default_mechanics, SGD, quantity, "discrete") < 1e-6
    assert _dev(default_mechanics, SGD, quantity, "continuous") < 1e-3


def test_bn_eps_breaks_scale_law_visibly(default_mechanics):
    broken = _dev(default_mechanics, SGD_EPS, "scale", "discrete")
    assert 1e-6 < broken < 1e-2, broken  # order eps / variance, reported, not hidden
    assert _dev(default_mechanics, SGD_EPS, "rescale", "discrete") < 1e-6
    assert _dev(default_mechanics, SGD_EPS, "translation", "discrete") < 1e-6


@pytest.mark.parametrize("quantity", ["translation", "scale", "rescale"])
def test_momentum_predictions(default_mechanics, quantity):
    assert _dev(default_mechanics, MOM, quantity, "discrete") < 1e-6
    # the paper's continuous (modified-equation) prediction, per layer
    rows = default_mechanics[
        (default_mechanics.run == MOM) & (default_mechanics.quantity == quantity)
    ]
    assert (rows.max_rel_dev_continuous < 1e-2).all(), rows


def test_no_prediction_is_said_plainly(tmp_path):
    study = cfg.load(ROOT / "config" / "config.yaml")["studies"]["mechanics"]
    study = {**study, "sweep": {}, "train": {**study["train"], "epochs": 1, "optimizer": "adam"}}
    run = cfg.expand_runs("m", study)[0]
    train_run(tmp_path / "r", run.hparams, progress=False)
    extract_run(tmp_path / "r", tmp_path / "r.h5")
    table = cache_metric(
        "rescale",
        [
            {
                "name": "r",
                "extract": tmp_path / "r.h5",
                "run_dir": tmp_path / "r",
                "trace": tmp_path / "r" / "trace.h5",
            }
        ],
        tmp_path / "t.parquet",
        tmp_path / "s.parquet",
    )
    assert table.theory_discrete.isna().all() and (table.note.str.contains("adam")).all()
    assert table.empirical.notna().all()
