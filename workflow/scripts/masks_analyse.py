"""The modularity tables of one run's masks."""

from pathlib import Path

from pipeline.jobs import run_step
from pipeline.masks.study import analyse

stages = Path(snakemake.input.stages)
run_step(
    snakemake,
    analyse,
    Path(snakemake.input.final).parent,
    {name: stages / f"{name}.pt" for name in snakemake.params.spec["stages"]},
    snakemake.params.spec,
    snakemake.output[0],
    run=snakemake.wildcards.run,
    data_dir=snakemake.params.data_dir,
    device=snakemake.params.device,
    threads=snakemake.threads,
)
