# Extract (checkpoints -> HDF5 time series) and the metric cache (one table per study and
# metric). Like every rule's, the cache rule's `code` param changes when, and only when, the code
# the job runs changes: here the metric's own code, not the other metrics' (common.smk: code).


rule extract:
    input:
        manifest=run_file("{study}", "{run}", "manifest"),
        hparams=run_file("{study}", "{run}", "hparams"),
    output:
        "results/{study}/extract/{run}.h5",
    log:
        "results/{study}/logs/extract/{run}.log",
    benchmark:
        "results/{study}/benchmarks/extract/{run}.tsv"
    params:
        code=code("extract.py"),
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
        code=code("cache.py", register_metric=lambda w: w.metric),
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
