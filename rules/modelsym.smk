# Model zoos, representation alignment and stitching (Godfrey et al.): members (vectorised zoo
# jobs, or ordinary runs selected on validation), their features on a probe set, every similarity
# measure and stitching type over sampled pairs, the rotation control, one table per part.
from pipeline.modelsym.similarity import register_similarity
from pipeline.modelsym import register_stitching_layer


#: (study, zoo, chunk index, seeds) of every vectorised zoo job
ZOO_CHUNKS = [
    (study, zoo, chunk, seeds)
    for study in PLAN.having("modelsym")
    for zoo, chunk, seeds in PLAN.kind(study).zoo_chunks()
]


for study, zoo, chunk, seeds in ZOO_CHUNKS:

    rule:
        name:
            f"zoo_{study}_{zoo}_chunk{chunk}"
        output:
            members=[PLAN.kind(study).member_file(zoo, s) for s in seeds],
            summary=f"results/{study}/zoo/{zoo}/chunk~{chunk}/summary.json",
        log:
            f"results/{study}/logs/zoo/{zoo}/chunk{chunk}.log",
        benchmark:
            f"results/{study}/benchmarks/zoo/{zoo}/chunk{chunk}.tsv"
        params:
            hparams=zoo_study.zoo_hparams(PLAN.study(study), zoo),
            seeds=seeds,
            code=zoo_code(study, zoo),
            summary_code=zoo_summary_code(study, zoo),
            device=DEVICE,
            data_dir=config.get("data_dir", "data"),
        threads: PLAN.study(study).get("resources", {}).get("threads", max(THREADS, 2))
        # every modelsym job waits on the zoos, and the rotation control is one long job: start
        # them before the short jobs of other studies so the rest overlaps them
        priority: 1
        resources:
            mem_mb=PLAN.study(study).get("resources", {}).get("mem_mb", 4000),
            runtime=PLAN.study(study).get("resources", {}).get("runtime", 120),
            **site_resources(gpus=gpus_of(study)),
        conda:
            "../workflow/envs/pipeline.yaml"
        script:
            "../workflow/scripts/zoo_train.py"


rule zoo_select:
    input:
        manifest=run_file("{study}", "zoo~{zoo}/seed~{seed}", "manifest"),
        final=run_file("{study}", "zoo~{zoo}/seed~{seed}", "final"),
    output:
        "results/{study}/zoo/{zoo}/selected/seed~{seed}.pt",
    log:
        "results/{study}/logs/zoo_select/{zoo}/seed~{seed}.log",
    benchmark:
        "results/{study}/benchmarks/zoo_select/{zoo}/seed~{seed}.tsv"
    wildcard_constraints:
        study=studies("modelsym"),
        seed=r"\d+",
    params:
        code=code("zoo_select.py"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/zoo_select.py"


for study in PLAN.having("modelsym"):
    for zoo, block in PLAN.study(study)["zoos"].items():

        rule:
            name:
                f"features_{study}_{zoo}"
            input:
                [PLAN.kind(study).member_file(zoo, s) for s in block["seeds"]],
            output:
                [PLAN.kind(study).features_file(zoo, s) for s in block["seeds"]],
            log:
                f"results/{study}/logs/features/{zoo}.log",
            benchmark:
                f"results/{study}/benchmarks/features/{zoo}.tsv"
            params:
                probe=PLAN.study(study).get("probe", {}),
                code=code("zoo_features.py", study_config(study)),
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
                "../workflow/scripts/zoo_features.py"


rule alignment:
    input:
        pair_files("alignment", ("member_a", "member_b", "features_a", "features_b")),
    output:
        "results/{study}/alignment/{similarity}.parquet",
    log:
        "results/{study}/logs/alignment/{similarity}.log",
    benchmark:
        "results/{study}/benchmarks/alignment/{similarity}.tsv"
    wildcard_constraints:
        study=studies("modelsym"),
        similarity=_alternatives(register_similarity.names()),
    params:
        entries=lambda w: PLAN.kind(w.study).pair_entries("alignment"),
        options=lambda w: PLAN.study(w.study)["alignment"]["metrics"][w.similarity],
        code=code("alignment.py", register_similarity=lambda w: w.similarity),
        device=DEVICE,
        data_dir=config.get("data_dir", "data"),
    threads: 1
    resources:
        mem_mb=8000,
        runtime=60,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/alignment.py"


rule stitching:
    input:
        pair_files("stitching", ("member_a", "member_b")),
    output:
        "results/{study}/stitching/{stitch}.parquet",
    log:
        "results/{study}/logs/stitching/{stitch}.log",
    benchmark:
        "results/{study}/benchmarks/stitching/{stitch}.tsv"
    wildcard_constraints:
        study=studies("modelsym"),
    params:
        spec=lambda w: PLAN.study(w.study)["stitching"]["types"][w.stitch],
        entries=lambda w: PLAN.kind(w.study).pair_entries("stitching"),
        layers=lambda w: PLAN.study(w.study)["stitching"].get("layers", "activations"),
        settings=lambda w: PLAN.study(w.study)["stitching"].get("settings", {}),
        code=code("stitching.py", register_stitching_layer=stitching_type),
        device=DEVICE,
        data_dir=config.get("data_dir", "data"),
    threads: train_threads
    resources:
        mem_mb=4000,
        runtime=120,
        **site_resources(gpus=study_gpus),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/stitching.py"


rule rotation:
    input:
        lambda w: [m["member"] for m in PLAN.kind(w.study).rotation_members()],
    output:
        "results/{study}/tables/rotation.parquet",
    log:
        "results/{study}/logs/rotation.log",
    benchmark:
        "results/{study}/benchmarks/rotation.tsv"
    wildcard_constraints:
        study=studies("modelsym"),
    params:
        members=lambda w: PLAN.kind(w.study).rotation_members(),
        options=lambda w: PLAN.study(w.study)["rotation"],
        code=code("rotation.py"),
        device=DEVICE,
        data_dir=config.get("data_dir", "data"),
    threads: train_threads
    priority: 1
    resources:
        mem_mb=4000,
        runtime=120,
        **site_resources(gpus=study_gpus),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/rotation.py"


rule modelsym_collect:
    input:
        lambda w: [
            f"results/{w.study}/{w.part}/{key}.parquet" for key in PLAN.kind(w.study).measures(w.part)
        ],
    output:
        "results/{study}/tables/{part}.parquet",
    log:
        "results/{study}/logs/collect_{part}.log",
    benchmark:
        "results/{study}/benchmarks/collect_{part}.tsv"
    wildcard_constraints:
        study=studies("modelsym"),
        part="alignment|stitching",
    params:
        code=code("modelsym_collect.py"),
    threads: 1
    resources:
        mem_mb=2000,
        runtime=10,
        **site_resources(),
    conda:
        "../workflow/envs/pipeline.yaml"
    script:
        "../workflow/scripts/modelsym_collect.py"
