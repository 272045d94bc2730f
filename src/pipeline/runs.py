"""Training a run with the extensions its hyperparameters ask for.

A science that changes how a run trains (teleportation, say) registers a *training extension*
under the name of its hyperparameter section: ``@register_extension("teleport")`` on
``fn(section: dict, hparams: dict) -> callback`` (see :func:`pipeline.train.loop.train_run` for
the callback hooks). :func:`train` builds the callbacks of the sections present in the run's
hyperparameters and trains; the core loop never imports a science.

Each run's ``summary.json`` records under ``code`` the fingerprint of the code that trained it
(:data:`TRAIN_CODE`, see :mod:`pipeline.fingerprint`), so ``make stale`` can list the runs of
studies that do not re-run on code changes whose code has changed since.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import io
from pipeline.fingerprint import code_fingerprint
from pipeline.registry import Registry
from pipeline.train.loop import train_run

#: What a run's recorded code fingerprint covers (with the run's hyperparameters as its config).
TRAIN_CODE = "pipeline.runs:train"

register_extension = Registry("training extension", "register_extension")


def train(root, hparams: dict, **kwargs) -> dict:
    """``train_run`` with the callbacks of every registered extension the hparams carry; the
    summary records the code fingerprint."""
    callbacks = [
        register_extension.get(name)(hparams[name], hparams)
        for name in register_extension.names()
        if name in hparams
    ]
    summary = train_run(root, hparams, callbacks=tuple(callbacks), **kwargs)
    summary["code"] = code_fingerprint(TRAIN_CODE, hparams)
    io.write_json(Path(root) / "summary.json", summary)
    return summary


def train_many(roots: list, hparams: list[dict], **kwargs) -> list[dict]:
    """Several runs in one process, one after the other (each resumable on its own)."""
    return [train(root, hp, **kwargs) for root, hp in zip(roots, hparams, strict=True)]
