"""A zoo's members' activations at every probe layer, on the study's probe set (HDF5 each)."""

from pipeline.jobs import run_step
from pipeline.modelsym.study import extract_all

run_step(
    snakemake,
    extract_all,
    list(snakemake.input),
    list(snakemake.output),
    data_dir=snakemake.params.data_dir,
    device=snakemake.params.device,
    **snakemake.params.probe,
)
