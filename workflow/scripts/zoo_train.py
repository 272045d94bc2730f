"""One vectorised zoo job: a member file per seed."""

from pathlib import Path

from pipeline.jobs import run_step
from pipeline.modelsym.study import train_members

run_step(
    snakemake,
    train_members,
    Path(snakemake.output.summary).parent,
    snakemake.params.hparams,
    snakemake.params.seeds,
    code=snakemake.params.summary_code.value,
    device=snakemake.params.device,
    data_dir=snakemake.params.data_dir,
    threads=snakemake.threads,
)
