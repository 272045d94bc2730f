"""Trained results whose code changed, in studies that set ``rerun_on_code_change: false``.

Such a study's training jobs carry their code fingerprint as a param Snakemake does not compare
(:class:`pipeline.fingerprint.Untracked`), so editing the training code re-runs none of them. Each
run records the fingerprint of the code that trained it in its ``summary.json`` (``code``); a run
is *stale* when that differs from the fingerprint of today's code (or was never recorded, for runs
trained before records existed). ``make stale`` prints one output file per stale job, to force
them with ``snakemake --cores all --forcerun $(make -s stale)``, or, after checking that the code
change does not matter to them, ``--accept`` records today's fingerprint without re-running
(the files' modification times are kept, so nothing downstream re-runs either).

    python -m pipeline.stale [--configfile config/config.yaml] [--accept]
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline import io
from pipeline.config import load
from pipeline.fingerprint import code_fingerprint
from pipeline.layout import run_file
from pipeline.registry import source_constant
from pipeline.studies import Plan


@dataclass(frozen=True)
class Stale:
    output: str  # the file to pass to --forcerun
    summary: Path  # where the fingerprint is recorded
    recorded: str | None
    current: str


def _check(summary: Path, output: str, target: str, config) -> Stale | None:
    if not summary.is_file():
        return None  # not trained yet: Snakemake trains it anyway
    recorded = io.read_json(summary).get("code")
    current = code_fingerprint(target, config)
    return None if recorded == current else Stale(output, summary, recorded, current)


def stale_jobs(plan: Plan, root: str | Path = ".") -> list[Stale]:
    """Every stale training job of the plan's studies with ``rerun_on_code_change: false``."""
    train_code = source_constant("pipeline.train.extensions", "TRAIN_CODE")  # (it imports torch)
    root = Path(root)
    out = []
    for name, runs in plan.runs.items():
        spec = plan.study(name)
        if spec.get("rerun_on_code_change", True):
            continue
        for run in runs:
            summary = root / run_file(name, run.name, "summary")
            found = _check(summary, run_file(name, run.name, "final"), train_code, run.hparams)
            out += [found] if found else []
        for summary, target, config in plan.kind(name).recorded_jobs():
            found = _check(root / summary, summary, target, config)
            out += [found] if found else []
    return out


def accept(jobs: list[Stale]) -> None:
    """Record today's fingerprint in each job's summary, keeping the file's modification time."""
    for job in jobs:
        stat = job.summary.stat()
        summary = io.read_json(job.summary)
        summary["code"] = job.current
        io.write_json(job.summary, summary)
        os.utime(job.summary, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline.stale", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--configfile", default="config/config.yaml")
    parser.add_argument(
        "--accept", action="store_true", help="record today's code as theirs, re-running nothing"
    )
    args = parser.parse_args(argv)
    plan = Plan.from_config(load(args.configfile))
    jobs = stale_jobs(plan)
    for job in jobs:
        print(job.output)
    unrecorded = sum(job.recorded is None for job in jobs)
    print(
        f"{len(jobs)} stale training job(s) in studies with rerun_on_code_change: false"
        + (f" ({unrecorded} trained before code fingerprints were recorded)" if unrecorded else "")
        + ("; accepted today's code for them" if args.accept and jobs else ""),
        file=sys.stderr,
    )
    if args.accept:
        accept(jobs)


if __name__ == "__main__":
    main()
