"""Training a run with the extensions its hyperparameters ask for.

A science that changes how a run trains (teleportation, say) registers a *training extension*
under the name of its hyperparameter section: ``@register_extension("teleport")`` on
``fn(section: dict, hparams: dict) -> callback`` (see :func:`pipeline.train.loop.train_run` for
the callback hooks). :func:`train` builds the callbacks of the sections present in the run's
hyperparameters and trains; the core loop never imports a science.

Each run's ``summary.json`` records under ``code`` the fingerprint of the code that trained it
(:data:`TRAIN_CODE`, see :mod:`pipeline.fingerprint`), so ``make stale`` can list the runs of
studies that do not re-run on code changes whose code has changed since. The workflow computes it
when it builds the job graph and passes it in (``code``); a job computes it only without one.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.layout import RunPaths
from pipeline.registry import Registry
from pipeline.train.loop import train_run

#: What a run's recorded code fingerprint covers (with the run's hyperparameters as its config).
TRAIN_CODE = "pipeline.train.extensions:train"

register_extension = Registry("training extension", "register_extension")


def train(root, hparams: dict, code: str | None = None, **kwargs) -> dict:
    """``train_run`` with the callbacks of every registered extension the hparams carry; the
    summary records the code fingerprint: ``code``, or computed here (``code_fingerprint(
    TRAIN_CODE, hparams)``, about 0.5 s) if not given."""
    callbacks = [
        register_extension.get(name)(hparams[name], hparams)
        for name in register_extension.names()
        if name in hparams
    ]
    summary = train_run(root, hparams, callbacks=tuple(callbacks), **kwargs)
    from pipeline.fingerprint import record_code

    return record_code(summary, RunPaths(Path(root)).summary, TRAIN_CODE, hparams, code)


def train_many(roots: list, hparams: list[dict], codes: list | None = None, **kwargs) -> list:
    """Several runs in one process, one after the other (each resumable on its own); ``codes``:
    each run's code fingerprint, as :func:`train`'s ``code``."""
    codes = [None] * len(roots) if codes is None else codes
    return [
        train(root, hp, code, **kwargs)
        for root, hp, code in zip(roots, hparams, codes, strict=True)
    ]
