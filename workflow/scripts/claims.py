"""Check one study's claims over its tables."""

from pipeline.claims.check import check_study
from pipeline.jobs import run_step

run_step(
    snakemake,
    check_study,
    snakemake.wildcards.study,
    snakemake.params.spec,
    snakemake.params.tables,
    snakemake.params.runs,
    snakemake.output[0],
)
