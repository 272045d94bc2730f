"""One similarity measure over every sampled pair of the study's zoos."""

from pipeline.modelsym.study import alignment_table
from pipeline.workflow import run_step

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
