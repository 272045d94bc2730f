"""The rotation/projection control on the study's listed members."""

from pipeline.jobs import run_step
from pipeline.modelsym.study import rotation_table

run_step(
    snakemake,
    rotation_table,
    snakemake.params.members,
    snakemake.params.options,
    snakemake.output[0],
    data_dir=snakemake.params.data_dir,
    device=snakemake.params.device,
    threads=snakemake.threads,
)
