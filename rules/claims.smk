# Claims: each study's paper claims checked over its tables (pipeline.claims), one table per
# study, then one for all studies and the report's "Claims" page. Tables only: after an edit to a
# claim, `snakemake results/claims.parquet` re-checks the existing results without retraining.
# A claim that does not hold is a row of the table, never a failed job.


rule claims:
    input:
        lambda w: list(PLAN.claim_tables(w.study).values()),
    output:
        "results/{study}/claims.parquet",
    log:
        "results/{study}/logs/claims.log",
    benchmark:
        "results/{study}/benchmarks/claims.tsv"
    params:
        tables=lambda w: PLAN.claim_tables(w.study),
        spec=lambda w: PLAN.study(w.study),
        runs=claim_runs,
        code=code("claims.py", register_claim=lambda w: study_claims(w.study)),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        **site_resources(),
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
        code=code("claims_collect.py"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/claims_collect.py"
