"""The shipped SLURM profile on a real single-node cluster (make test-slurm; CI runs it).

Starts munge, slurmctld and slurmd (installing Debian's packages if needed) with one node of 2
CPUs and 12 GB, smaller than what the grouped small jobs used to ask for. Runs the tiny config
with ``profiles/slurm`` unchanged plus only what a user would pass on the command line; stops a
training job as SLURM does before its time limit (SIGTERM to the job's steps) and checks that it
writes a checkpoint and that the retry resumes from it. Checks that every job ran under SLURM,
that the results equal a local run, that the grouped job asked for no more than its largest
member, that no account was guessed, and that a run SLURM could never schedule fails at once
with a clear message. Stops the daemons it started, by PID.
"""

from __future__ import annotations

import re
import subprocess
import time

import pandas as pd
import pytest
import slurm_cluster
import torch
import yaml
from conftest import VENV_BIN, copy_workflow, snakemake

from pipeline import io

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
TINY = "config/tests/tiny.yaml"
#: the shipped profile, and what a user might add on the command line (a faster first check)
PROFILE = ("--profile", "profiles/slurm", "--slurm-init-seconds-before-status-checks", "2")
STOPPED = "results/tiny/runs/momentum~0.0/seed~1"


def _config(wf, mutate=None) -> str:
    """The tiny config, training long enough to be stopped mid-run, two metrics."""
    config = yaml.safe_load((wf / TINY).read_text())
    study = config["studies"]["tiny"]
    study["train"]["epochs"] = 60
    study["metrics"] = ["scale", "performance"]
    if mutate:
        mutate(config)
    (wf / "slurm.yaml").write_text(yaml.safe_dump(config))
    return "--configfile=slurm.yaml"


@pytest.fixture(scope="module")
def cluster():
    started = slurm_cluster.start()
    yield started
    slurm_cluster.stop(started)


def _stop_training_job(run_dir, proc, timeout=600) -> str:
    """Once ``run_dir`` has checkpoints, SIGTERM its SLURM job's steps, as the profile's
    ``--signal=TERM@120`` does two minutes before the time limit; return the job id."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if len(list((run_dir / "checkpoints").glob("*.pt"))) >= 3:
            jobs = subprocess.run(
                ["squeue", "-h", "-o", "%i|%k"], capture_output=True, text=True, check=True
            ).stdout.splitlines()
            (job,) = [j.split("|")[0] for j in jobs if "momentum~0.0" in j]
            subprocess.run(["scancel", "--signal=TERM", job], check=True)
            return job
        time.sleep(0.1)
    raise AssertionError(f"{run_dir} never got a checkpoint under SLURM")


@pytest.fixture(scope="module")
def runs(cluster, tmp_path_factory):
    base = tmp_path_factory.mktemp("slurm")
    local = copy_workflow(base / "local")
    slurm = copy_workflow(base / "slurm")
    snakemake(local, "--cores", "2", _config(local), timeout=900)
    log = base / "snakemake.log"
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [str(VENV_BIN / "snakemake"), *PROFILE, _config(slurm)],
            cwd=slurm,
            stdout=f,
            stderr=subprocess.STDOUT,
        )
        try:
            stopped_job = _stop_training_job(slurm / STOPPED, proc)
            proc.wait(timeout=1800)
        finally:
            proc.kill()
    out = log.read_text()
    assert proc.returncode == 0, out
    return local, slurm, out, stopped_job


def test_every_job_ran_under_slurm(runs):
    _, slurm, _, _ = runs
    logs = sorted((slurm / "results").rglob("logs/**/*.log"))
    assert len(logs) == 10  # 2 train, 2 extract, 2 cache, 2 plots, claims, claims_collect
    ids = {}
    for log in logs:
        found = re.findall(r"SLURM_JOB_ID=(\d+)", log.read_text())
        assert found, f"{log} has no SLURM job id"
        ids[log] = found[-1]
    # the claims jobs (one for the study, one for all) run as their own SLURM jobs
    small = {i for log, i in ids.items() if "/train/" not in str(log) and "claims" not in log.name}
    assert len(small) == 1, "the small jobs ran as one group job"
    assert len(set(ids.values())) == 5, "each training run and each claims job is its own job"


def test_a_stopped_training_job_is_retried_and_resumes(runs):
    _, slurm, out, stopped_job = runs
    slurm_logs = slurm / ".snakemake/slurm_logs/rule_train_traced/tiny_momentum~0.0_seed~1"
    stopped = (slurm_logs / f"{stopped_job}.log").read_text()  # kept: the job failed
    found = re.search(
        r"TrainingStopped: stopped by SIGTERM at step (\d+) .*\(checkpoint written\)", stopped
    )
    assert found, stopped
    assert "Trying to restart job" in out
    retried = (slurm / "results/tiny/logs/train/momentum~0.0/seed~1.log").read_text()
    (retry,) = re.findall(r"SLURM_JOB_ID=(\d+)", retried)
    assert retry != stopped_job, retried
    assert re.search(rf"resuming \S+ from step {found.group(1)}\n", retried), retried


def test_slurm_results_equal_local_results(runs):
    local, slurm, _, _ = runs
    finals = sorted((local / "results").rglob("final.pt"))
    assert len(finals) == 2
    for path in finals:
        a = io.load_torch(path)["model"]
        b = io.load_torch(slurm / path.relative_to(local))["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), path
    assert io.read_json(local / STOPPED / "checkpoints.json") == io.read_json(
        slurm / STOPPED / "checkpoints.json"
    )
    pd.testing.assert_frame_equal(
        pd.read_parquet(local / STOPPED / "history.parquet"),
        pd.read_parquet(slurm / STOPPED / "history.parquet"),
    )
    for table in sorted((local / "results" / "tiny" / "cache").glob("*.parquet")):
        pd.testing.assert_frame_equal(
            pd.read_parquet(table), pd.read_parquet(slurm / table.relative_to(local))
        )
    for fig in ("tiny_scale", "tiny_performance"):
        assert (slurm / "results" / f"{fig}.pdf").stat().st_size > 1000


def test_grouped_job_asks_for_no_more_than_its_largest_member(runs):
    _, _, out, _ = runs
    (group,) = re.findall(r"SLURM jobid (\d+) \(log: \S*group_small", out)
    job = subprocess.run(
        ["scontrol", "show", "job", group], capture_output=True, text=True, check=True
    ).stdout
    assert "JobState=COMPLETED" in job, job
    assert re.search(r"NumCPUs=1 ", job) and "mem=8000M" in job, job  # one cache job's request


def test_no_account_is_guessed(runs):
    _, _, out, _ = runs
    for guessing in ("No SLURM account given", "SLURM account via sacct", "Guessed SLURM account"):
        assert guessing not in out, out


def test_a_run_slurm_cannot_schedule_fails_with_a_clear_message(cluster, tmp_path):
    """More CPUs than the node has (SLURM would leave it pending forever) and a GPU the
    cluster lacks: the workflow stops before submitting anything, naming both."""
    wf = copy_workflow(tmp_path / "big")

    def too_big(config):
        config["studies"]["tiny"]["resources"] = {"threads": 4}
        config["studies"]["gpu"] = {**config["studies"]["tiny"], "resources": {"gpus": 1}}
        config["studies"]["gpu"]["figures"] = {}

    started = time.time()
    proc = snakemake(wf, *PROFILE, _config(wf, too_big), check=False, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "SLURM cannot run these jobs" in out, out
    assert re.search(r"train_traced: .*--cpus-per-task=4 .*Requested node configuration", out)
    assert re.search(r"train_traced: .*--gpus=1: .*gres", out), out
    assert "has been submitted" not in out and time.time() - started < 300
