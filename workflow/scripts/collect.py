"""One table from several (per problem, per run, per strategy) tables."""

from pipeline.jobs import run_step
from pipeline.recovery.study import collect_tables

run_step(
    snakemake,
    collect_tables,
    list(snakemake.input),
    snakemake.output[0],
    snakemake.params.get("labels"),
)
