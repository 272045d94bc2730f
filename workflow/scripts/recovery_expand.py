"""Expand: train the overparameterised students of one problem (vectorised, resumable)."""

from pathlib import Path

from pipeline.jobs import run_step
from pipeline.recovery.study import run_expand

run_step(
    snakemake,
    run_expand,
    Path(snakemake.output.students).parent,
    snakemake.params.teacher,
    snakemake.params.probe,
    snakemake.params.expand,
    device=snakemake.params.device,
    data_dir=snakemake.params.data_dir,
    threads=snakemake.threads,
    problem=snakemake.wildcards.problem,
)
