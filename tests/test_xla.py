"""device: xla - training, extraction and the metric cache through torch-xla (make test-xla runs
this on the CPU PJRT device, in its own environment with torch 2.9.0 + torch-xla 2.9.0)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch

from pipeline import config as cfg
from pipeline import io
from pipeline.extract import extract_run
from pipeline.mechanics.cache import cache_metric
from pipeline.train.loop import train_run

pytestmark = pytest.mark.xla
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def xla():
    if os.environ.get("REQUIRE_XLA"):
        import torch_xla  # noqa: F401  (must be there: fail, never skip)
    else:
        pytest.importorskip("torch_xla")
    os.environ.setdefault("PJRT_DEVICE", "CPU")


def _run(tmp_path, device, momentum):
    study = cfg.load(ROOT / "config" / "tests" / "tiny.yaml")["studies"]["tiny"]
    study = {**study, "sweep": {}, "train": {**study["train"], "momentum": momentum}}
    run = cfg.expand_runs("tiny", study)[0]
    root = tmp_path / device / f"m{momentum}"
    summary = train_run(root, run.hparams, device=device, progress=False)
    extract_run(root, root.with_suffix(".h5"))
    runs = [
        {
            "name": f"m{momentum}",
            "extract": root.with_suffix(".h5"),
            "run_dir": root,
            "trace": root / "trace.h5",
        }
    ]
    tables = {
        m: cache_metric(m, runs, root.parent / f"{m}.parquet", root.parent / f"{m}.s.parquet")
        for m in ("translation", "scale", "rescale")
    }
    return summary, root, tables


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_train_extract_cache_on_xla_match_cpu(xla, tmp_path, momentum):
    summary, root, tables = _run(tmp_path, "xla", momentum)
    assert summary["status"] == "completed" and summary["steps"] == 42
    _, cpu_root, cpu_tables = _run(tmp_path, "cpu", momentum)
    a = io.load_torch(root / "final.pt")["model"]
    b = io.load_torch(cpu_root / "final.pt")["model"]
    for k in a:
        assert a[k].device.type == "cpu"
        if k.endswith("running_var"):
            # torch-xla updates BN's running variance with the biased batch variance (eager
            # torch: unbiased, n/(n-1)); it only enters eval mode, never the training path
            ratio = a[k] / b[k]
            assert ((ratio < 1) & (ratio > 1 - 1 / 63)).all(), k  # batch 64: at most 1/(n-1)
            continue
        assert torch.allclose(a[k], b[k], rtol=1e-8, atol=1e-10), k
    for metric, table in tables.items():
        dev = (table.empirical - table.theory_discrete).abs() / table.magnitude.clip(lower=1e-300)
        if metric != "scale":  # the tiny config keeps BN's eps at 1e-5, which breaks scale
            assert dev.max() < 1e-6, metric  # the laws hold on XLA too (float64)
        for column in ("empirical", "theory_discrete", "theory_continuous"):
            pd.testing.assert_series_equal(
                table[column], cpu_tables[metric][column], rtol=1e-7, atol=1e-10
            )
