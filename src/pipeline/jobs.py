"""Glue for the thin scripts in ``workflow/scripts``: logging to the rule's log file, and clear
one-line errors (naming the file or config key) instead of bare tracebacks."""

from __future__ import annotations

import logging
import os
import sys
import traceback

#: Errors that explain themselves: their message is shown as is, without a traceback.
CLEAR = (
    "ArtifactError",
    "DataMissingError",
    "ConfigError",
    "TrainingDiverged",
    "TrainingStopped",
    "StructureError",
    "UnpicklingError",
)


def run_step(snakemake, fn, *args, **kwargs):
    """Call ``fn(*args, **kwargs)`` with stderr and logging sent to ``snakemake.log[0]``."""
    log_path = snakemake.log[0] if len(snakemake.log) else None
    terminal = sys.stderr
    if log_path:
        sys.stderr = open(log_path, "a", buffering=1)  # noqa: SIM115 (lives as long as the job)
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        force=True,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if "SLURM_JOB_ID" in os.environ:
        logging.getLogger("pipeline").info(
            "running under SLURM_JOB_ID=%s on %s",
            os.environ["SLURM_JOB_ID"],
            os.environ.get("SLURMD_NODENAME", "?"),
        )
    try:
        return fn(*args, **kwargs)
    except Exception as err:
        clear = type(err).__name__ in CLEAR or isinstance(
            err, (FileNotFoundError, KeyError, ValueError)
        )
        message = f"{type(err).__name__}: {err}"
        if not clear:
            traceback.print_exc(file=sys.stderr)
        print(f"ERROR in rule {snakemake.rule}: {message}", file=sys.stderr)
        if log_path:
            print(f"ERROR in rule {snakemake.rule}: {message}\n(log: {log_path})", file=terminal)
        sys.exit(1)
