# Training: one job per run, or `runs_per_job` runs per job for studies of many small runs.
# Resume state (checkpoints/, segments/) is not a declared output, so Snakemake never deletes
# it: a job re-run after a kill resumes where it stopped.


rule train:
    output:
        **run_outputs("{study}", "{run}"),
    log:
        "results/{study}/logs/train/{run}.log",
    benchmark:
        "results/{study}/benchmarks/train/{run}.tsv"
    wildcard_constraints:
        study=studies("train"),
    params:
        hparams=train_params,
        code=train_code,
        summary_code=train_summary_code,
        device=DEVICE,
        data_dir=config.get("data_dir", "data"),
    threads: train_threads
    resources:
        mem_mb=lambda w: study_resources(w, "mem_mb", 4000),
        runtime=lambda w: study_resources(w, "runtime", 60),
        **site_resources(gpus=study_gpus),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/train.py"


use rule train as train_traced with:
    output:
        **run_outputs("{study}", "{run}", traced=True),
    wildcard_constraints:
        study=studies("train_traced"),


for study, index, chunk in TRAIN_CHUNKS:

    rule:
        name:
            f"train_{study}_chunk{index}"
        output:
            [f"{run_dir(study, r.name)}/{f}" for r in chunk for f in run_files(study)],
        log:
            f"results/{study}/logs/train/chunk{index}.log",
        benchmark:
            f"results/{study}/benchmarks/train/chunk{index}.tsv"
        params:
            roots=[run_dir(study, r.name) for r in chunk],
            hparams=[r.nondefault for r in chunk],
            code=chunk_code(study, chunk),
            summary_codes=chunk_summary_codes(chunk),
            device=DEVICE,
            data_dir=config.get("data_dir", "data"),
        threads: PLAN.study(study).get("resources", {}).get("threads", THREADS)
        resources:
            mem_mb=PLAN.study(study).get("resources", {}).get("mem_mb", 4000),
            runtime=PLAN.study(study).get("resources", {}).get("runtime", 60) * len(chunk),
            **site_resources(gpus=gpus_of(study)),
        conda:
            "../workflow/envs/pipeline.yaml"
        script:
            "../workflow/scripts/train_chunk.py"
