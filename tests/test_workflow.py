"""The workflow end to end: the embedded default config in a fresh copy of the repository."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time

import pandas as pd
import pytest
import yaml
from conftest import copy_workflow, snakemake

pytestmark = pytest.mark.slow
#: The tests that read the timed default run: make test runs them after the others, alone.
serial = pytest.mark.serial

#: Jobs of the embedded default, by rule (a test fails when the DAG grows unnoticed: the default
#: must stay small, torch costs ~2 s per job here).
DEFAULT_JOBS = {
    # neural mechanics
    "train_traced": 4,
    "extract": 4,
    "cache": 5,
    # teleportation: the Figure 6 grid in 4 jobs of 8 runs, interpolation, three analyses
    "train_teleport_sgd_chunk0": 1,
    "train_teleport_sgd_chunk1": 1,
    "train_teleport_sgd_chunk2": 1,
    "train_teleport_sgd_chunk3": 1,
    "train_teleport_interp_chunk0": 1,
    "teleport_validation": 1,
    "teleport_interpolation": 1,
    "teleport_analysis": 3,
    # modelsym: three vectorised zoos (the 8-unit one for the rotation control only)
    "zoo_modelsym_mlp_chunk0": 1,
    "zoo_modelsym_cnn_chunk0": 1,
    "zoo_modelsym_mlp8_chunk0": 1,
    "features_modelsym_mlp": 1,
    "features_modelsym_cnn": 1,
    "alignment": 6,
    "stitching": 6,
    "rotation": 1,
    "modelsym_collect": 2,
    # weight masks
    "masks_train": 3,
    "masks_analyse": 3,
    "masks_collect": 3,
    # Expand-and-Cluster and lottery tickets
    "recovery_expand": 3,
    "recovery_cluster": 3,
    "recovery_collect": 3,
    "prune": 3,
    "lottery_collect": 1,
    # plain training runs (masks references, BatchNorm zoo members, the digits teacher)
    "train": 4,
    "plot": 23,
    # each study's paper claims over its tables, then one table for all
    "claims": 12,
    "claims_collect": 1,
    "all": 1,
}


def job_counts(dry_run_output: str) -> dict[str, int]:
    table = dry_run_output.split("Job stats:")[-1]
    counts = {}
    for line in table.splitlines():
        m = re.match(r"^(\w+)\s+(\d+)$", line.strip())
        if m and m.group(1) != "total":
            counts[m.group(1)] = int(m.group(2))
    return counts


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """The default workflow, run once in a copy; yields (directory, seconds)."""
    dest = copy_workflow(tmp_path_factory.mktemp("default") / "wf")
    start = time.perf_counter()
    snakemake(dest, "--cores", "2", timeout=900)
    return dest, time.perf_counter() - start


def test_dry_run_shows_the_dag_without_running(workflow_copy):
    out = snakemake(workflow_copy, "-n").stdout
    assert job_counts(out) == DEFAULT_JOBS
    assert not (workflow_copy / "results").exists()
    dag = snakemake(workflow_copy, "--dag").stdout
    assert "digraph" in dag and "train_traced" in dag


@serial
def test_default_builds_every_figure_in_under_ten_minutes(finished):
    wf, seconds = finished
    assert seconds < 600, f"default workflow took {seconds:.0f} s"
    config = yaml.safe_load((wf / "config" / "config.yaml").read_text())
    figures = [f for s in config["studies"].values() for f in s.get("figures", {})]
    assert figures
    for fig in figures:
        assert (wf / "results" / f"{fig}.pdf").stat().st_size > 1000
        assert (wf / "results" / "figures" / f"{fig}.png").stat().st_size > 1000
    # nothing left to do
    assert "Nothing to be done" in snakemake(wf, "-n").stdout


#: every claim the embedded default shows (a claim that stops applying fails the test)
DEFAULT_CLAIMS = {
    "mechanics": [
        "translation_discrete",
        "scale_discrete",
        "rescale_discrete",
        "continuous_sgd",
        "bn_eps_breaks_scale",
    ],
    "teleport_sgd": ["teleport_speeds_up_sgd"],
    "teleport_micro": ["micro_teleport_angle"],
    "teleport_interp": ["teleport_invariance"],
    "modelsym": [
        "grelu_stitching_close_to_linear",
        "grelu_stitching_beats_rank1",
        "rotation_grelu_absorbed",
        "weight_matching_removes_barrier",
    ],
    "modules_addmul": ["inverse_mask_specialises", "specialised_masks_overlap_less"],
    "modules_double_add": ["inverse_mask_specialises", "pairs_do_not_share"],
    "modules_removal": ["class_removal_is_specific"],
    "recovery": ["teacher_neurons_recovered", "reconstruction_generalises"],
    "digits_teacher": ["lottery_ticket"],
}


@serial
def test_every_claim_of_the_default_holds_on_every_seed(finished):
    wf, _ = finished
    table = pd.read_parquet(wf / "results" / "claims.parquet")
    claims = table[table.scope == "claim"]
    shown = {s: sorted(g.claim) for s, g in claims.groupby("study")}
    assert shown == {s: sorted(c) for s, c in DEFAULT_CLAIMS.items()}
    failing = table[~table.holds & (table.scope == "check")]
    assert failing.empty, failing[["study", "claim", "run", "item", "value", "threshold"]]
    assert (table[table.scope == "run"].groupby(["study", "claim"]).size() >= 1).all()
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.claims", "results/claims.parquet"],
        cwd=wf,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert f"{len(claims)} of {len(claims)} claims hold" in out


@serial
def test_every_default_figure_draws_its_tables(finished):
    """Each figure of the default, redrawn from the tables its plot job read: every panel draws
    finite data (lines, boxes, bars, images or points) and no title, label or legend says nan;
    the figures of one kind draw one panel per what their tables hold where that is fixed."""
    from drawn import capture, check_drawn

    from pipeline.config import load
    from pipeline.plots import draw
    from pipeline.studies import Plan

    wf, _ = finished

    plan = Plan.from_config(load(wf / "config" / "config.yaml"))
    for fig, (study, spec) in plan.figures().items():
        block = plan.study(study)
        if "table" in spec:
            folder = "masks/tables" if "masks" in block else "tables"
            table, summary = wf / "results" / study / folder / f"{spec['table']}.parquet", None
        else:
            metric = spec.get("metric", "performance")
            table = wf / "results" / study / "cache" / f"{metric}.parquet"
            summary = wf / "results" / study / "cache" / f"{metric}.summary.parquet"
        with capture() as figs:
            draw(spec["kind"], table, summary, spec, wf / "redraw.pdf", wf / "redraw.png")
        panels = check_drawn(figs[0])
        if spec["kind"] == "weight_matching_barrier":
            assert [p.title.split(":")[0] for p in panels] == ["train", "test"], fig
            assert all(p.lines == 2 for p in panels), fig


@serial
def test_editing_one_metric_reruns_only_its_jobs(finished):
    wf, _ = finished
    metrics = wf / "src" / "pipeline" / "mechanics" / "metrics.py"
    source = metrics.read_text()
    edited = source.replace(
        "    _require_start(run)\n    return conservation_table(run, rescale_sets(run.structure))",
        "    _require_start(run)\n    sets = rescale_sets(run.structure)\n"
        "    return conservation_table(run, sets)",
    )
    assert edited != source
    metrics.write_text(edited)
    try:
        out = snakemake(wf, "-n").stdout
        reruns = {"cache": 1, "plot": 1, "claims": 1, "claims_collect": 1, "all": 1}
        assert job_counts(out) == reruns
        assert "results/mechanics/cache/rescale.parquet" in out
        assert "results/mechanics_rescale.pdf" in out
    finally:
        metrics.write_text(source)
    # a comment-only edit changes nothing
    metrics.write_text(source.replace("def rescale(", "# just a comment\ndef rescale("))
    try:
        assert "Nothing to be done" in snakemake(wf, "-n").stdout
    finally:
        metrics.write_text(source)


@serial
def test_editing_a_claim_rechecks_only_its_studies_without_retraining(finished):
    wf, _ = finished
    claims = wf / "src" / "pipeline" / "claims" / "masks.py"
    source = claims.read_text()
    edited = source.replace(
        "    tables: Tables, context: Context, factor: float = 3.0, solves: float = 0.5\n",
        "    tables: Tables, context: Context, factor: float = 3.5, solves: float = 0.5\n",
    )
    assert edited != source
    claims.write_text(edited)
    try:
        out = snakemake(wf, "-n", "results/claims.parquet").stdout
        # the three mask studies run this claim (modules_removal's has no subtask pairs: no
        # rows); no other study's claims job and no training job re-runs
        assert job_counts(out) == {"claims": 3, "claims_collect": 1}
        assert "results/modules_addmul/claims.parquet" in out
        assert "results/modules_double_add/claims.parquet" in out
        assert "results/modules_removal/claims.parquet" in out
    finally:
        claims.write_text(source)
    assert "Nothing to be done" in snakemake(wf, "-n").stdout


def test_bad_config_fails_before_any_job(workflow_copy):
    path = workflow_copy / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["studies"]["mechanics"]["train"]["lrr"] = 0.1
    path.write_text(yaml.safe_dump(config))
    proc = snakemake(workflow_copy, "--cores", "1", check=False)
    assert proc.returncode != 0
    assert "studies.mechanics.train.lrr: unknown key; allowed:" in proc.stdout + proc.stderr
    assert not (workflow_copy / "results").exists()


def test_paper_configs_plan_without_data(workflow_copy):
    """-n, --dag and --rulegraph work on every paper config with no dataset on disk."""
    papers = sorted((workflow_copy / "config" / "paper").glob("*.yaml"))
    assert papers
    for paper in papers:
        configfile = f"--configfile={paper.relative_to(workflow_copy)}"
        out = snakemake(workflow_copy, "-n", configfile)
        assert job_counts(out.stdout).get("all") == 1, paper.name
        assert "digraph" in snakemake(workflow_copy, "--dag", configfile).stdout
        assert "digraph" in snakemake(workflow_copy, "--rulegraph", configfile).stdout


@serial
def test_report_has_every_figure_captioned_by_study_with_config_and_versions(finished):
    wf, _ = finished
    snakemake(wf, "--report", "results/report.html")
    html = (wf / "results" / "report.html").read_text()
    config = yaml.safe_load((wf / "config" / "config.yaml").read_text())
    for study, spec in config["studies"].items():
        assert study in html
        for fig, fig_spec in spec.get("figures", {}).items():
            assert f"{fig}.png" in html, fig
            caption = " ".join(fig_spec["caption"].split()[:4])
            assert caption in html, caption
    assert "torch 2." in html and "matplotlib" in html  # package versions
    assert "studies" in html and "bn_eps" in html  # the configuration
    # the claims page, whose category the report lists first (it sorts categories by name)
    assert "claims.html" in html
    categories = json.loads(re.search(r"categories = (\{.*?\});", html).group(1))
    assert sorted(categories, key=str.casefold)[0] == "Claims", sorted(categories)
