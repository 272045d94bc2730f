# Extract (checkpoints -> HDF5 time series) and the metric cache (one table per study and
# metric). The cache rule's fingerprint param changes when, and only when, the metric's own
# source (or a pipeline helper it calls) changes.


rule extract:
    input:
        manifest="results/{study}/runs/{run}/checkpoints.json",
        hparams="results/{study}/runs/{run}/hparams.json",
    output:
        "results/{study}/extract/{run}.h5",
    log:
        "results/{study}/logs/extract/{run}.log",
    benchmark:
        "results/{study}/benchmarks/extract/{run}.tsv"
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/extract.py"


rule cache:
    input:
        unpack(cache_inputs),
    output:
        table="results/{study}/cache/{metric}.parquet",
        summary="results/{study}/cache/{metric}.summary.parquet",
    log:
        "results/{study}/logs/cache/{metric}.log",
    benchmark:
        "results/{study}/benchmarks/cache/{metric}.tsv"
    params:
        fingerprint=metric_fingerprint,
        runs=cache_runs,
    threads: 1
    resources:
        mem_mb=8000,
        runtime=30,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/cache.py"
