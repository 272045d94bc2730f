# Weight masks (Csordas et al.): every stage's mask on each run's final network, the modularity
# tables per run, then one table per kind for the study; and the permuted-input transfer.
from pipeline.masks.plan import TABLES as MASK_TABLES


rule masks_train:
    input:
        final=run_file("{study}", "{run}", "final"),
        hparams=run_file("{study}", "{run}", "hparams"),
    output:
        directory("results/{study}/masks/{run}/stages"),
    log:
        "results/{study}/logs/masks_train/{run}.log",
    benchmark:
        "results/{study}/benchmarks/masks_train/{run}.tsv"
    wildcard_constraints:
        study=studies("masks"),
    params:
        spec=masks_spec,
        code=code("masks_train.py"),
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
        "../workflow/scripts/masks_train.py"


rule masks_analyse:
    input:
        stages="results/{study}/masks/{run}/stages",
        final=run_file("{study}", "{run}", "final"),
    output:
        directory("results/{study}/masks/{run}/tables"),
    log:
        "results/{study}/logs/masks_analyse/{run}.log",
    benchmark:
        "results/{study}/benchmarks/masks_analyse/{run}.tsv"
    wildcard_constraints:
        study=studies("masks"),
    params:
        spec=masks_spec,
        code=code("masks_analyse.py"),
        device=DEVICE,
        data_dir=config.get("data_dir", "data"),
    threads: 1
    resources:
        mem_mb=4000,
        runtime=30,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/masks_analyse.py"


rule masks_collect:
    input:
        masks_tables_inputs,
    output:
        expand("results/{{study}}/masks/tables/{table}.parquet", table=MASK_TABLES),
    log:
        "results/{study}/logs/masks_collect.log",
    benchmark:
        "results/{study}/benchmarks/masks_collect.tsv"
    wildcard_constraints:
        study=studies("masks"),
    params:
        code=code("masks_collect.py"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/masks_collect.py"


rule masks_transfer:
    output:
        accuracy="results/{study}/transfer/accuracy.parquet",
        sharing="results/{study}/transfer/sharing.parquet",
        masks="results/{study}/transfer/masks.pt",
    log:
        "results/{study}/logs/masks_transfer.log",
    benchmark:
        "results/{study}/benchmarks/masks_transfer.tsv"
    wildcard_constraints:
        study=studies("transfer"),
    params:
        study=lambda w: PLAN.study(w.study),
        code=code("masks_transfer.py"),
        device=DEVICE,
        data_dir=config.get("data_dir", "data"),
    threads: train_threads
    resources:
        mem_mb=lambda w: study_resources(w, "mem_mb", 4000),
        runtime=lambda w: study_resources(w, "runtime", 120),
        **site_resources(gpus=study_gpus),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/masks_transfer.py"
