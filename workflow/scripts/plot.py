"""Draw one figure from cached tables (PDF + PNG)."""

from pipeline.plots import draw
from pipeline.workflow import run_step

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
