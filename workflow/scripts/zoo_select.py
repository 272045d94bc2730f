"""A zoo member from an ordinary run: its best checkpoint on the validation split."""

from pathlib import Path

from pipeline.jobs import run_step
from pipeline.modelsym.members import select_checkpoint

run_step(snakemake, select_checkpoint, Path(snakemake.input.manifest).parent, snakemake.output[0])
