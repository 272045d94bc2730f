"""Cluster settings without a cluster: the site file reaches every job whatever its rule's name,
malformed site files are named, the schedulability check reports what SLURM refuses, and
``make resume`` resumes the target and config the user ran."""

from __future__ import annotations

import re
import subprocess
from types import SimpleNamespace

import pytest
import yaml
from conftest import ROOT, snakemake

from pipeline import cluster

SITE = {
    "every_job": {"slurm_account": "proj7"},
    "cpu_jobs": {"slurm_partition": "cpus"},
    "gpu_jobs": {"slurm_partition": "gpus", "gpu_model": "a100"},
}
#: rules that fit a model: with ``device: cuda`` each asks for a GPU
GPU_RULES = r"train|train_traced|train_\w+_chunk\d+|zoo_\w+_chunk\d+|masks_train|masks_transfer|"
GPU_RULES += r"stitching|rotation|recovery_expand|recovery_lottery|prune"


def _job_resources(dry_run: str) -> list[tuple[str, dict]]:
    """(rule, resources) of every job a dry run lists."""
    jobs = []
    for block in re.split(r"\n(?=(?:local)?rule \w+:)", dry_run):
        head = re.match(r"(?:local)?rule (\w+):", block)
        found = re.search(r"^\s+resources: (.*)$", block, re.MULTILINE)
        if head and found:
            pairs = (p.split("=", 1) for p in found.group(1).split(", "))
            jobs.append((head.group(1), {k: v for k, v in pairs}))
    return jobs


@pytest.mark.slow
def test_site_settings_reach_every_job_whatever_its_rule_name(workflow_copy):
    (workflow_copy / "profiles/slurm/site.yaml").write_text(yaml.safe_dump(SITE))
    out = snakemake(
        workflow_copy, "-n", "--configfile=config/config.yaml", "--config", "device=cuda"
    ).stdout
    jobs = [(rule, res) for rule, res in _job_resources(out) if rule != "all"]
    assert len(jobs) > 90 and {"train_teleport_sgd_chunk0", "zoo_modelsym_mlp_chunk0"} <= {
        rule for rule, _ in jobs
    }
    for rule, res in jobs:
        gpu = re.fullmatch(GPU_RULES, rule) is not None
        assert res.get("gpu", "0") == ("1" if gpu else "0"), (rule, res)
        assert res["slurm_account"] == "proj7", (rule, res)
        assert res["slurm_partition"] == ("gpus" if gpu else "cpus"), (rule, res)
        assert res.get("gpu_model") == ("a100" if gpu else None), (rule, res)


def test_shipped_site_file_sets_nothing_and_the_profile_no_partition():
    assert cluster.read_site(ROOT / "profiles/slurm/site.yaml") == {s: {} for s in cluster.SECTIONS}
    profile = yaml.safe_load((ROOT / "profiles/slurm/config.yaml").read_text())
    text = yaml.safe_dump(profile)
    assert "slurm_partition" not in text and "slurm_account" not in text
    assert profile["set-resource-scopes"] == {"group_slot": "local"}
    assert (
        profile["resources"]
        == {"group_slot": 1}
        == {"group_slot": profile["default-resources"]["group_slot"]}
    )


@pytest.mark.parametrize(
    "text,message",
    [
        ("cpu_jobs: {mem_mb: 100}", r"cpu_jobs.mem_mb is not a site setting"),
        ("gpus: {slurm_partition: gpu}", r"unknown section 'gpus'"),
        ("gpu_jobs: [gpu]", r"gpu_jobs must be a mapping"),
        ("every_job: {slurm_account: [a, b]}", r"every_job.slurm_account must be a string"),
        ("every_job: {slurm_account: a", r"not valid YAML"),
    ],
)
def test_malformed_site_file_is_named(tmp_path, text, message):
    path = tmp_path / "site.yaml"
    path.write_text(text)
    with pytest.raises(cluster.SiteError, match=f"{re.escape(str(path))}: .*{message}"):
        cluster.read_site(path)


def test_job_resources_pick_the_section_of_each_job():
    static = cluster.job_resources(SITE)
    assert static == {"slurm_account": "proj7", "slurm_partition": "cpus"}
    assert cluster.job_resources(SITE, 2) == {
        "slurm_account": "proj7",
        "slurm_partition": "gpus",
        "gpu_model": "a100",
        "gpu": 2,
    }
    res = cluster.job_resources(SITE, lambda w: int(w.study == "big"))
    big, small = SimpleNamespace(study="big"), SimpleNamespace(study="small")
    assert res["gpu"](big) == 1 and res["slurm_partition"](big) == "gpus"
    assert res["slurm_partition"](small) == "cpus" and res["gpu_model"](small) is None
    assert cluster.job_resources({s: {} for s in cluster.SECTIONS}, lambda w: 1).keys() == {"gpu"}


def test_unschedulable_requests_are_reported_once_each_with_slurms_reason():
    calls = []

    def sbatch(args, **kw):
        calls.append(args)
        refused = "--cpus-per-task=8" in args
        return SimpleNamespace(
            returncode=1 if refused else 0,
            stderr="sbatch: error: Batch job submission failed: Requested node configuration "
            "is not available\n"
            if refused
            else "",
        )

    small = {"cpus": 1, "mem_mb": 4000, "runtime": 30, "gpu": 0, "slurm_partition": None}
    big = {**small, "cpus": 8, "slurm_partition": "cpus"}
    problems = cluster.unschedulable(
        [("cache", small), ("train", big), ("train", big), ("extract", small)], run=sbatch
    )
    assert len(calls) == 2 and all(c[:2] == ["sbatch", "--test-only"] for c in calls)
    assert problems == [
        "train: --ntasks=1 --cpus-per-task=8 --partition=cpus --mem=4000 --time=30: "
        "sbatch: error: Batch job submission failed: Requested node configuration is not "
        "available"
    ]
    gpu = cluster.sbatch_test_args({**small, "gpu": 2, "gpu_model": "a100"})
    assert "--gpus=a100:2" in gpu and gpu[-1] == "--wrap=true"


def test_make_resume_takes_the_target_and_config(tmp_path):
    out = subprocess.run(
        [
            "make",
            "-n",
            "resume",
            "TARGET=results/fig6.pdf",
            "CONFIG=config/paper/teleportation.yaml",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    lines = [line for line in out.splitlines() if "bin/snakemake " in line]
    assert len(lines) == 2 and "--unlock" in lines[0], out
    for line in lines:
        assert "--configfile config/paper/teleportation.yaml" in line, line
        assert line.endswith("results/fig6.pdf"), line
    assert "--profile profiles/local" in lines[1]


class _Resources(dict):
    __getattr__ = dict.__getitem__


def test_no_account_setting_submits_without_guessing_an_account(monkeypatch):
    """snakemake-executor-plugin-slurm 2.8.0 ignores --slurm-no-account and guesses an account
    with sacct (warning twice where accounting is off); the workflow makes it submit without -A."""
    plugin = pytest.importorskip("snakemake_executor_plugin_slurm")
    guesses, warnings = [], []
    monkeypatch.setattr(plugin, "get_account", lambda logger: guesses.append(1))
    monkeypatch.setattr(plugin, "validate_account", lambda account, logger: account)
    cluster.honour_no_account()
    executor = SimpleNamespace(
        workflow=SimpleNamespace(executor_settings=SimpleNamespace(no_account=True)),
        logger=SimpleNamespace(warning=warnings.append),
        _fallback_account_arg=None,
    )
    job = SimpleNamespace(resources=_Resources())
    assert list(plugin.Executor.get_account_arg(executor, job)) == [""]
    assert guesses == [] and warnings == []
    job = SimpleNamespace(resources=_Resources(slurm_account="proj7"))
    assert list(plugin.Executor.get_account_arg(executor, job)) == [" -A proj7"]
