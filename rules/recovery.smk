# Expand-and-Cluster (Martinelli et al.): per problem, N overparameterised students trained in
# one vectorised job, then the layer-wise clustering into the recovered network and its
# comparison with the teacher; the students' lottery tickets; and prune-rewind-retrain lottery
# levels of ordinary training runs (studies with a `prune` block).
from pipeline.recovery.plan import TABLES as RECOVERY_TABLES


rule recovery_expand:
    input:
        teacher_inputs,
    output:
        teacher="results/{study}/recovery/{problem}/students/teacher.pt",
        students="results/{study}/recovery/{problem}/students/students.pt",
        history="results/{study}/recovery/{problem}/students/students_history.parquet",
    log:
        "results/{study}/logs/recovery_expand/{problem}.log",
    benchmark:
        "results/{study}/benchmarks/recovery_expand/{problem}.tsv"
    wildcard_constraints:
        study=studies("recovery"),
    params:
        teacher=resolved_teacher,
        probe=lambda w: problem(w)["probe"],
        expand=lambda w: problem(w)["expand"],
        code=code("recovery_expand.py"),
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
        "../workflow/scripts/recovery_expand.py"


rule recovery_cluster:
    input:
        teacher="results/{study}/recovery/{problem}/students/teacher.pt",
        students="results/{study}/recovery/{problem}/students/students.pt",
    output:
        reconstruction="results/{study}/recovery/{problem}/cluster/reconstruction.pt",
        clusters="results/{study}/recovery/{problem}/cluster/clusters.parquet",
        neurons="results/{study}/recovery/{problem}/cluster/neurons.parquet",
        recovery="results/{study}/recovery/{problem}/cluster/recovery.parquet",
        finetune="results/{study}/recovery/{problem}/cluster/finetune_history.parquet",
    log:
        "results/{study}/logs/recovery_cluster/{problem}.log",
    benchmark:
        "results/{study}/benchmarks/recovery_cluster/{problem}.tsv"
    wildcard_constraints:
        study=studies("recovery"),
    params:
        probe=lambda w: problem(w)["probe"],
        cluster=lambda w: problem(w)["cluster"],
        expand=lambda w: problem(w)["expand"],
        tolerance=lambda w: PLAN.kind(w.study).tolerance,
        code=code("recovery_cluster.py"),
        device=DEVICE,
        data_dir=config.get("data_dir", "data"),
    threads: train_threads
    resources:
        mem_mb=lambda w: study_resources(w, "mem_mb", 4000),
        runtime=lambda w: study_resources(w, "runtime", 60),
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/recovery_cluster.py"


rule recovery_collect:
    input:
        lambda w: PLAN.kind(w.study).collect_inputs(w.table),
    output:
        "results/{study}/tables/{table}.parquet",
    log:
        "results/{study}/logs/recovery_collect_{table}.log",
    benchmark:
        "results/{study}/benchmarks/recovery_collect_{table}.tsv"
    wildcard_constraints:
        study=studies("recovery"),
        table="|".join(RECOVERY_TABLES),
    params:
        code=code("collect.py"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/collect.py"


rule recovery_lottery:
    output:
        "results/{study}/recovery/{problem}/lottery/{strategy}/lottery.parquet",
    log:
        "results/{study}/logs/recovery_lottery/{problem}/{strategy}.log",
    benchmark:
        "results/{study}/benchmarks/recovery_lottery/{problem}/{strategy}.tsv"
    wildcard_constraints:
        study=studies("recovery"),
    params:
        teacher=resolved_teacher,
        probe=lambda w: problem(w)["probe"],
        expand=lambda w: problem(w)["expand"],
        lottery=lottery_settings,
        code=code("recovery_lottery.py"),
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
        "../workflow/scripts/recovery_lottery.py"


rule prune:
    input:
        final=run_file("{study}", "{run}", "final"),
    output:
        "results/{study}/prune/{run}/{strategy}/lottery.parquet",
    log:
        "results/{study}/logs/prune/{run}/{strategy}.log",
    benchmark:
        "results/{study}/benchmarks/prune/{run}/{strategy}.tsv"
    wildcard_constraints:
        study=studies("prune"),
        strategy="sparse_global|fc19|han",
    params:
        hparams=train_params,
        lottery=lottery_settings,
        code=code("prune.py"),
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
        "../workflow/scripts/prune.py"


rule lottery_collect:
    input:
        lottery_inputs,
    output:
        "results/{study}/tables/lottery.parquet",
    log:
        "results/{study}/logs/lottery_collect.log",
    benchmark:
        "results/{study}/benchmarks/lottery_collect.tsv"
    wildcard_constraints:
        study=studies("lottery"),
    params:
        code=code("collect.py"),
        labels=lottery_labels,
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/collect.py"
