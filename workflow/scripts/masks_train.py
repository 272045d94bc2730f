"""Every mask stage of one run, the reference first."""

from pathlib import Path

from pipeline.jobs import run_step
from pipeline.masks.study import train_stages

run_step(
    snakemake,
    train_stages,
    Path(snakemake.input.final).parent,
    snakemake.params.spec,
    snakemake.output[0],
    data_dir=snakemake.params.data_dir,
    device=snakemake.params.device,
    threads=snakemake.threads,
)
