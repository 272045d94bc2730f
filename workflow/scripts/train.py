"""Train one run, or resume it from its newest checkpoint."""

from pathlib import Path

from pipeline.config import resolve_hparams
from pipeline.jobs import run_step
from pipeline.train.extensions import train

run_step(
    snakemake,
    train,
    Path(snakemake.output.final).parent,
    resolve_hparams(snakemake.params.hparams),
    code=snakemake.params.summary_code.value,
    device=snakemake.params.device,
    data_dir=snakemake.params.data_dir,
    threads=snakemake.threads,
)
