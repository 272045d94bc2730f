"""Draw one figure from cached tables (PDF + PNG)."""

from pipeline.jobs import run_step
from pipeline.plots import draw

run_step(
    snakemake,
    draw,
    snakemake.params.kind,
    snakemake.input.table,
    snakemake.input.get("summary"),
    snakemake.params.spec,
    snakemake.output.pdf,
    snakemake.output.png,
)
