"""One metric over all runs of a study -> tidy parquet table and deviation summary."""

from pathlib import Path

from pipeline.jobs import run_step
from pipeline.mechanics.cache import cache_metric

names = snakemake.params.runs
none = [None] * len(names)
runs = [
    {"name": name, "run_dir": Path(summary).parent, "extract": extract, "trace": trace}
    for name, summary, extract, trace in zip(
        names,
        snakemake.input.summary,
        snakemake.input.get("extract", none),
        snakemake.input.get("trace", none),
        strict=True,
    )
]
run_step(
    snakemake,
    cache_metric,
    snakemake.wildcards.metric,
    runs,
    snakemake.output.table,
    snakemake.output.summary,
)
