"""Training a run with the extensions its hyperparameters ask for.

A science that changes how a run trains (teleportation, say) registers a *training extension*
under the name of its hyperparameter section: ``@register_extension("teleport")`` on
``fn(section: dict, hparams: dict) -> callback`` (see :func:`pipeline.train.loop.train_run` for
the callback hooks). :func:`train` builds the callbacks of the sections present in the run's
hyperparameters and trains; the core loop never imports a science.
"""

from __future__ import annotations

from pipeline.registry import Registry
from pipeline.train.loop import train_run

register_extension = Registry("training extension", "register_extension")


def train(root, hparams: dict, **kwargs) -> dict:
    """``train_run`` with the callbacks of every registered extension the hparams carry."""
    callbacks = [
        register_extension.get(name)(hparams[name], hparams)
        for name in register_extension.names()
        if name in hparams
    ]
    return train_run(root, hparams, callbacks=tuple(callbacks), **kwargs)


def train_many(roots: list, hparams: list[dict], **kwargs) -> list[dict]:
    """Several runs in one process, one after the other (each resumable on its own)."""
    return [train(root, hp, **kwargs) for root, hp in zip(roots, hparams, strict=True)]
