"""One table from the per-measure (or per-type) tables of a study."""

from pipeline.jobs import run_step
from pipeline.modelsym.study import collect

run_step(snakemake, collect, list(snakemake.input), snakemake.output[0])
