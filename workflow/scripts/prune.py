"""Prune-rewind-retrain lottery levels of one training run, for one strategy."""

from pathlib import Path

from pipeline.config import resolve_hparams
from pipeline.jobs import run_step
from pipeline.pruning.lottery import run_lottery
from pipeline.train.pruning import LotteryHparams

run_step(
    snakemake,
    run_lottery,
    Path(snakemake.output[0]).parent,
    resolve_hparams(snakemake.params.hparams),
    LotteryHparams(**snakemake.params.lottery),
    device=snakemake.params.device,
    data_dir=snakemake.params.data_dir,
    threads=snakemake.threads,
)
