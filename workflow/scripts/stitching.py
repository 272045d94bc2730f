"""One stitching type over every sampled pair of the study's zoos."""

from pipeline.jobs import run_step
from pipeline.modelsym.study import stitching_table

run_step(
    snakemake,
    stitching_table,
    snakemake.wildcards.stitch,
    snakemake.params.spec,
    snakemake.params.entries,
    snakemake.params.layers,
    snakemake.params.settings,
    snakemake.output[0],
    data_dir=snakemake.params.data_dir,
    device=snakemake.params.device,
    threads=snakemake.threads,
)
