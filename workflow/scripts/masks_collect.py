"""One table per kind for the study, from the per-run tables."""

from pathlib import Path

from pipeline.jobs import run_step
from pipeline.masks.study import collect


def collect_all(run_dirs, outputs):
    for out in outputs:
        collect([Path(d) / Path(out).name for d in run_dirs], out)


run_step(snakemake, collect_all, list(snakemake.input), list(snakemake.output))
