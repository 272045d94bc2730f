"""Checkpoints of one run -> one HDF5 file of [T, ...] time series."""

from pathlib import Path

from pipeline.extract import extract_run
from pipeline.jobs import run_step

run_step(snakemake, extract_run, Path(snakemake.input.manifest).parent, snakemake.output[0])
