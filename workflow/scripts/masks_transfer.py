"""Masks over successive input permutations, earlier masks' weights frozen."""

from pathlib import Path

from pipeline.jobs import run_step
from pipeline.masks.study import run_transfer

study = snakemake.params.study
run_step(
    snakemake,
    run_transfer,
    study,
    study["transfer"],
    Path(snakemake.output.accuracy).parent,
    data_dir=snakemake.params.data_dir,
    device=snakemake.params.device,
    threads=snakemake.threads,
)
