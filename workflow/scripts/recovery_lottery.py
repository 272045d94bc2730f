"""Lottery-ticket levels of one problem's students (masks across the stacked students)."""

from pathlib import Path

from pipeline.jobs import run_step
from pipeline.recovery.study import run_student_lottery

run_step(
    snakemake,
    run_student_lottery,
    Path(snakemake.output[0]).parent,
    snakemake.params.teacher,
    snakemake.params.probe,
    snakemake.params.expand,
    snakemake.params.lottery,
    device=snakemake.params.device,
    data_dir=snakemake.params.data_dir,
    threads=snakemake.threads,
)
