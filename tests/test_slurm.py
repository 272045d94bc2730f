"""The tiny config through a real single-node SLURM cluster (make test-slurm; CI runs it).

Starts munge, slurmctld and slurmd (installing Debian's packages if needed), runs the workflow with
the SLURM executor, checks every job ran under SLURM and that the results equal a local run, checks
the sbatch line of a GPU rule, and stops the daemons it started.
"""

from __future__ import annotations

import re

import pandas as pd
import pytest
import slurm_cluster
import torch
import yaml
from conftest import copy_workflow, snakemake

from pipeline import io

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
TINY = "config/tests/tiny.yaml"


@pytest.fixture(scope="module")
def cluster():
    started = slurm_cluster.start()
    yield
    slurm_cluster.stop(started)


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm")
    local = copy_workflow(base / "local")
    slurm = copy_workflow(base / "slurm")
    snakemake(local, "--cores", "2", f"--configfile={TINY}", timeout=900)
    snakemake(slurm, "--profile", "tests/profiles/slurm", f"--configfile={TINY}", timeout=1800)
    return local, slurm


def test_every_job_ran_under_slurm(runs):
    _, slurm = runs
    logs = sorted((slurm / "results").rglob("logs/**/*.log"))
    assert len(logs) >= 10  # 2 train, 2 extract, 4 cache, 2 plots
    ids = []
    for log in logs:
        found = re.findall(r"SLURM_JOB_ID=(\d+)", log.read_text())
        assert found, f"{log} has no SLURM job id"
        ids.append(found[0])
    assert len(set(ids)) == len(ids), "each job is its own SLURM job"


def test_slurm_results_equal_local_results(runs):
    local, slurm = runs
    finals = sorted((local / "results").rglob("final.pt"))
    assert len(finals) == 2
    for path in finals:
        a = io.load_torch(path)["model"]
        b = io.load_torch(slurm / path.relative_to(local))["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), path
    for table in sorted((local / "results" / "tiny" / "cache").glob("*.parquet")):
        pd.testing.assert_frame_equal(
            pd.read_parquet(table), pd.read_parquet(slurm / table.relative_to(local))
        )
    for fig in ("tiny_scale", "tiny_performance"):
        assert (slurm / "results" / f"{fig}.pdf").stat().st_size > 1000


def test_sbatch_line_of_a_gpu_rule_requests_the_gpu(cluster, tmp_path):
    wf = copy_workflow(tmp_path / "gpu")
    config = yaml.safe_load((wf / TINY).read_text())
    config["studies"]["tiny"]["resources"] = {"gpus": 1}
    (wf / "gpu.yaml").write_text(yaml.safe_dump(config))
    # the test cluster has no GPU, so SLURM refuses the job; the plugin logs the sbatch line first
    proc = snakemake(
        wf,
        "--profile",
        "tests/profiles/slurm",
        "--configfile=gpu.yaml",
        "--verbose",
        "-j1",
        "results/tiny/runs/momentum~0.0/seed~1/final.pt",
        check=False,
        timeout=300,
    )
    calls = [
        line
        for line in (proc.stdout + proc.stderr).splitlines()
        if line.strip().startswith("sbatch ") or "sbatch call:" in line
    ]
    assert calls, proc.stdout + proc.stderr
    assert any("--gpus=1" in c and "rule_train_traced" in c for c in calls), calls
