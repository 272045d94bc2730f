"""Every study's claims in one table, and the report's claims page."""

from pipeline.claims.check import collect
from pipeline.jobs import run_step

run_step(snakemake, collect, list(snakemake.input), snakemake.output.table, snakemake.output.html)
