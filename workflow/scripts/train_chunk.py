"""Train several runs in one job (each resumes from its own checkpoints)."""

from pipeline.config import resolve_hparams
from pipeline.jobs import run_step
from pipeline.train.extensions import train_many

run_step(
    snakemake,
    train_many,
    snakemake.params.roots,
    [resolve_hparams(h) for h in snakemake.params.hparams],
    codes=list(snakemake.params.summary_codes.value),
    device=snakemake.params.device,
    data_dir=snakemake.params.data_dir,
    threads=snakemake.threads,
)
