"""Cluster: the recovered network of one problem, and its comparison with the teacher."""

from pathlib import Path

from pipeline.jobs import run_step
from pipeline.recovery.study import run_cluster

run_step(
    snakemake,
    run_cluster,
    Path(snakemake.output.recovery).parent,
    Path(snakemake.input.students).parent,
    snakemake.params.probe,
    snakemake.params.cluster,
    problem=snakemake.wildcards.problem,
    device=snakemake.params.device,
    data_dir=snakemake.params.data_dir,
    threads=snakemake.threads,
    tolerance=snakemake.params.tolerance,
    expand=snakemake.params.expand,
)
