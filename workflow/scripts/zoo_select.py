"""A zoo member from an ordinary run: its best checkpoint on the validation split."""

from pathlib import Path

from pipeline.modelsym.members import select_checkpoint
from pipeline.workflow import run_step

run_step(snakemake, select_checkpoint, Path(snakemake.input.manifest).parent, snakemake.output[0])
