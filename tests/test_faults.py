"""Faults and bad input: kills, corrupt artifacts, missing data, crafted pickles, divergence.
Each test also checks that nothing already written is lost or corrupted."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import time
from pathlib import Path

import h5py
import pandas as pd
import pytest
import torch
import yaml
from conftest import VENV_BIN, copy_workflow, snakemake

from pipeline import io
from pipeline.mechanics.artifacts import RunArtifacts

TINY = "config/tests/tiny.yaml"


def _config(wf: Path, mutate, name="test.yaml") -> str:
    config = yaml.safe_load((wf / TINY).read_text())
    mutate(config["studies"]["tiny"])
    (wf / name).write_text(yaml.safe_dump(config))
    return name


# -- library-level: clear errors naming the file ---------------------------------------------------
def test_truncated_checkpoint_is_named(tmp_path):
    path = tmp_path / "step000000010.pt"
    io.save_torch(path, {"model": {"w": torch.ones(100, 100)}})
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(io.ArtifactError, match=f"{path}: truncated or corrupt checkpoint"):
        io.load_torch(path)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "evil.pt"
    torch.save({"model": _Exploit()}, path)
    with pytest.raises(io.ArtifactError, match="refused to load"):
        io.load_torch(path)
    assert not (tmp_path / "pwned").exists()


def test_corrupt_hdf5_and_empty_parquet_are_named(tmp_path):
    h5 = tmp_path / "run.h5"
    with h5py.File(h5, "w") as f:
        f["x"] = list(range(1000))
    h5.write_bytes(h5.read_bytes()[:300])
    with pytest.raises(io.ArtifactError, match=f"{h5}: not a readable HDF5 file"):
        _ = RunArtifacts("r", tmp_path, extract=h5).steps
    empty = tmp_path / "history.parquet"
    empty.write_bytes(b"")
    with pytest.raises(io.ArtifactError, match=f"{empty}: not a readable parquet table"):
        io.read_parquet(empty)
    pd.DataFrame({"a": [1]}).to_parquet(empty)
    with pytest.raises(io.ArtifactError, match="lacks columns"):
        io.read_parquet(empty, ("step",))


# -- through the workflow ------------------------------------------------------------------------
@pytest.mark.slow
def test_corrupt_extract_stops_cache_with_a_clear_message(workflow_copy):
    wf = workflow_copy
    snakemake(wf, "--cores", "2", f"--configfile={TINY}", "results/tiny/cache/scale.parquet")
    h5 = wf / "results/tiny/extract/momentum~0.0/seed~1.h5"
    other = wf / "results/tiny/extract/momentum~0.9/seed~1.h5"
    before = other.read_bytes()
    h5.write_bytes(h5.read_bytes()[:200])
    proc = snakemake(
        wf,
        "--cores",
        "1",
        f"--configfile={TINY}",
        "-R",
        "cache",
        "results/tiny/cache/scale.parquet",
        check=False,
    )
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"ArtifactError: {h5.relative_to(wf)}: not a readable HDF5 file" in text, text
    assert other.read_bytes() == before  # nothing else damaged
    assert (wf / "results/tiny/runs/momentum~0.0/seed~1/final.pt").exists()


@pytest.mark.slow
def test_missing_data_is_reported_by_the_first_job_not_at_parse(workflow_copy):
    wf = workflow_copy
    name = _config(wf, lambda s: s["dataset"].update(name="mnist"))
    for flag in ("-n", "--dag", "--rulegraph"):
        snakemake(wf, flag, f"--configfile={name}")
    proc = snakemake(wf, "--cores", "1", f"--configfile={name}", check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "DataMissingError: dataset 'mnist'" in text and "MNIST/raw" in text, text
    assert "train-images-idx3-ubyte" in text or "images-idx3" in text


@pytest.mark.slow
def test_diverging_run_in_a_sweep_is_recorded_and_the_sweep_goes_on(workflow_copy):
    wf = workflow_copy

    def diverge(study):
        study["sweep"] = {"lr": [0.05, 1.0e6]}
        study["train"]["on_nan"] = "record"

    name = _config(wf, diverge)
    snakemake(wf, "--cores", "2", f"--configfile={name}")
    ok = io.read_json(wf / "results/tiny/runs/lr~0.05/seed~1/summary.json")
    bad = io.read_json(wf / "results/tiny/runs/lr~1000000.0/seed~1/summary.json")
    assert ok["status"] == "completed" and bad["status"] == "diverged"
    assert (wf / "results/tiny_performance.pdf").exists()


@pytest.mark.slow
def test_kill_snakemake_then_resume(tmp_path):
    """SIGKILL the whole snakemake process group mid-run; `snakemake --unlock` then the local
    profile (rerun-incomplete) redoes incomplete outputs, keeps complete ones, and training
    resumes from its checkpoints, ending bit-identical to an uninterrupted run."""

    def longer(study):
        study["train"]["epochs"] = 60
        study["checkpoints"] = {"every_steps": 25}
        study["metrics"], study["figures"] = ["performance"], {}

    ref = copy_workflow(tmp_path / "ref")
    name = _config(ref, longer)
    snakemake(ref, "--cores", "1", f"--configfile={name}")

    wf = copy_workflow(tmp_path / "killed")
    _config(wf, longer)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"}
    proc = subprocess.Popen(
        [str(VENV_BIN / "snakemake"), "--cores", "1", f"--configfile={name}"],
        cwd=wf,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    first = wf / "results/tiny/runs/momentum~0.0/seed~1"
    second = wf / "results/tiny/runs/momentum~0.9/seed~1"
    deadline = time.time() + 300
    while time.time() < deadline:
        done = [p for p in (first, second) if (p / "final.pt").exists()]
        running = [
            p
            for p in (first, second)
            if not (p / "final.pt").exists() and len(list((p / "checkpoints").glob("*.pt"))) >= 5
        ]
        if done and running:
            break
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    (done_run,) = done
    (killed_run,) = running
    kept = (done_run / "final.pt").stat().st_mtime_ns
    assert not (killed_run / "final.pt").exists()

    snakemake(wf, "--unlock", f"--configfile={name}")
    snakemake(wf, "--profile", "profiles/local", "--cores", "1", f"--configfile={name}")
    assert (done_run / "final.pt").stat().st_mtime_ns == kept, "complete output was redone"
    log = (
        wf / "results/tiny/logs/train" / killed_run.relative_to(wf / "results/tiny/runs")
    ).with_suffix(".log")
    assert "resuming" in log.read_text()
    for run in (first, second):
        a = io.load_torch(run / "final.pt")["model"]
        b = io.load_torch(ref / run.relative_to(wf) / "final.pt")["model"]
        assert all(torch.equal(a[k], b[k]) for k in a), run
    pd.testing.assert_frame_equal(
        pd.read_parquet(wf / "results/tiny/cache/performance.parquet"),
        pd.read_parquet(ref / "results/tiny/cache/performance.parquet"),
    )


def test_pickle_module_is_not_used_for_checkpoints():
    """Guard: every torch.load in the package passes weights_only=True."""
    root = Path(__file__).resolve().parents[1] / "src"
    for path in root.rglob("*.py"):
        for line in path.read_text().splitlines():
            if "torch.load(" in line:
                assert "weights_only=True" in line, f"{path}: {line.strip()}"
    assert pickle  # the CIFAR reader uses a restricted Unpickler (tests/test_data.py)
