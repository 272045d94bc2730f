"""One similarity measure over every sampled pair of the study's zoos."""

from pipeline.jobs import run_step
from pipeline.modelsym.study import alignment_table

run_step(
    snakemake,
    alignment_table,
    snakemake.wildcards.similarity,
    snakemake.params.options,
    snakemake.params.entries,
    snakemake.output[0],
    data_dir=snakemake.params.data_dir,
    device=snakemake.params.device,
    threads=snakemake.threads,
)
