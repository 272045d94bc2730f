"""One table from the per-measure (or per-type) tables of a study."""

from pipeline.modelsym.study import collect
from pipeline.workflow import run_step

run_step(snakemake, collect, list(snakemake.input), snakemake.output[0])
