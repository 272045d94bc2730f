"""One teleportation table: validation curves, interpolation, micro, statistics or histograms."""

from pathlib import Path

from pipeline.jobs import run_step
from pipeline.teleport.tables import write_study_table

out = snakemake.output[0]
kind = snakemake.wildcards.get("table", Path(out).stem)
run_step(
    snakemake,
    write_study_table,
    kind,
    out,
    snakemake.params.get("spec", {}),
    snakemake.config.get("data_dir", "data"),
    snakemake.params.get("runs"),
)
