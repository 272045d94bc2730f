"""Where a run's files live: the one definition of a run directory (the rules, the training
loop, extract and ``make stale`` all take their paths from here). Imports nothing heavy: the
workflow reads it at parse time.

Layout of a run directory (``results/{study}/runs/{run}/``)::

    hparams.json        every hyperparameter, resolved (declared output)
    summary.json        status (completed / diverged), final metrics, speed, code (declared)
    final.pt            final weights (declared output)
    history.parquet     per-step train loss/accuracy/lr and per-epoch eval metrics (declared)
    checkpoints.json    the checkpoint manifest extract reads (declared output)
    trace.h5            per-step mechanics trace, when ``train.mechanics`` (declared output)
    checkpoints/        step*.pt: the training engine's resume states (weights, optimizer,
                        schedule, RNG state, step), the manifest's among them
    segments/           *.npz: history and trace rows up to each checkpoint (resume state)

Snakemake deletes declared outputs before it re-runs a job, never ``checkpoints/`` or
``segments/``: a re-run resumes from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

RESULTS = "results"

#: name -> file (or folder) in a run directory
RUN_FILES = {
    "final": "final.pt",
    "history": "history.parquet",
    "hparams": "hparams.json",
    "manifest": "checkpoints.json",
    "summary": "summary.json",
    "trace": "trace.h5",
    "checkpoints": "checkpoints",
    "segments": "segments",
}
#: the declared outputs of a training job (``trace`` too when the run is traced)
DECLARED = ("final", "history", "hparams", "manifest", "summary")


def run_dir(study: str, run: str, root: str = RESULTS) -> str:
    """``results/{study}/runs/{run}`` (wildcards welcome: ``run_dir("{study}", "{run}")``)."""
    return f"{root}/{study}/runs/{run}"


def run_file(study: str, run: str, name: str, root: str = RESULTS) -> str:
    """The path of file ``name`` (a key of :data:`RUN_FILES`) of a run."""
    return f"{run_dir(study, run, root)}/{RUN_FILES[name]}"


def declared(traced: bool = False) -> tuple[str, ...]:
    """The names of a training job's declared outputs."""
    return DECLARED + (("trace",) if traced else ())


def run_outputs(study: str, run: str, traced: bool = False) -> dict[str, str]:
    """The declared outputs of the job training a run: ``{name: path}``."""
    return {name: run_file(study, run, name) for name in declared(traced)}


@dataclass(frozen=True)
class RunPaths:
    """The files of the run directory ``root``: ``RunPaths(root).final`` etc."""

    root: Path

    def __getattr__(self, name):
        if name in RUN_FILES:
            return self.root / RUN_FILES[name]
        raise AttributeError(name)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step{step:09d}.pt"

    def segment(self, step: int) -> Path:
        return self.segments / f"{step:09d}.npz"
