# Claims: each study's paper claims checked over its tables (pipeline.claims), one table per
# study, then one for all studies and the report's "Claims" page. Tables only: after an edit to a
# claim, `snakemake results/claims.parquet` re-checks the existing results without retraining.
# A claim that does not hold is a row of the table, never a failed job.
from pipeline.claims import register_claim


def claim_tables(study):
    """``key -> path`` of every table the study's claims may read (key: the path under
    results/<study>/ without .parquet): the study's tables, each metric's summary, every masks
    table."""
    paths = study_tables(study)
    paths += [
        f"results/{study}/cache/{metric}.summary.parquet"
        for metric in PLAN.study(study).get("metrics", [])
    ]
    if study in MASKS:
        paths += [f"results/{study}/masks/tables/{t}.parquet" for t in MASK_TABLES]
    prefix = f"results/{study}/"
    return {p[len(prefix) : -len(".parquet")]: p for p in dict.fromkeys(paths)}


def study_claims(study):
    """The registered claims whose tables the study has."""
    keys = claim_tables(study)
    return [
        name
        for name, entry in register_claim.entries().items()
        if all(t in keys for t in entry.meta.get("tables", ()))
    ]


def claims_fingerprint(wildcards):
    """The claims code a study's table depends on: the evaluation and its applicable claims."""
    parts = [source_fingerprint("pipeline.claims.check", "check_study")]
    parts += [register_claim.fingerprint(name) for name in study_claims(wildcards.study)]
    return "-".join(parts)


def claim_runs(wildcards):
    """What the claims know of each run: its seed, model block and training section."""
    return {
        r.name: {"seed": r.seed, "model": r.hparams["model"], "train": r.hparams.get("train", {})}
        for r in PLAN.runs[wildcards.study]
    }


rule claims:
    input:
        lambda w: list(claim_tables(w.study).values()),
    output:
        "results/{study}/claims.parquet",
    log:
        "results/{study}/logs/claims.log",
    benchmark:
        "results/{study}/benchmarks/claims.tsv"
    params:
        tables=lambda w: claim_tables(w.study),
        spec=lambda w: PLAN.study(w.study),
        runs=claim_runs,
        fingerprint=claims_fingerprint,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/claims.py"


rule claims_collect:
    input:
        expand("results/{study}/claims.parquet", study=STUDIES),
    output:
        table="results/claims.parquet",
        html=report(
            "results/claims.html",
            caption="../workflow/report/claims.rst",
            category="Claims",
        ),
    log:
        "results/logs/claims_collect.log",
    benchmark:
        "results/benchmarks/claims_collect.tsv"
    params:
        fingerprint=source_fingerprint("pipeline.claims.check", "collect"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/claims_collect.py"
