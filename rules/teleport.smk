# Teleportation tables (Armenta et al.): the Figure 6 grid's validation curves, the 1D
# interpolation between two runs, and the analysis-only studies (micro-teleportation,
# statistics, histograms). The grid's runs train through the ordinary train rule: their
# `teleport` hyperparameter section adds the teleport callback (pipeline.train.extensions).


rule teleport_validation:
    input:
        grid_inputs,
    output:
        "results/{study}/tables/validation.parquet",
    log:
        "results/{study}/logs/teleport_validation.log",
    benchmark:
        "results/{study}/benchmarks/teleport_validation.tsv"
    wildcard_constraints:
        study=studies("teleport_validation"),
    params:
        runs=lambda w: run_dirs(w.study),
        code=code("teleport_table.py"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/teleport_table.py"


rule teleport_interpolation:
    input:
        interpolation_inputs,
    output:
        "results/{study}/tables/interpolation.parquet",
    log:
        "results/{study}/logs/teleport_interpolation.log",
    benchmark:
        "results/{study}/benchmarks/teleport_interpolation.tsv"
    wildcard_constraints:
        study=studies("interpolation"),
    params:
        runs=lambda w: dict(list(run_dirs(w.study).items())[:2]),
        spec=lambda w: PLAN.study(w.study)["interpolation"],
        code=code("teleport_table.py"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/teleport_table.py"


rule teleport_analysis:
    output:
        "results/{study}/tables/{table}.parquet",
    log:
        "results/{study}/logs/teleport_{table}.log",
    benchmark:
        "results/{study}/benchmarks/teleport_{table}.tsv"
    wildcard_constraints:
        study=studies("teleport_analysis"),
        table="micro|statistics|histograms",
    params:
        spec=lambda w: PLAN.study(w.study),
        code=code("teleport_table.py"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/teleport_table.py"
