"""Optimizers, per-epoch learning-rate schedules and losses, from :class:`TrainHparams`.

The schedules are small explicit state machines (their state is a dict of numbers), so they
checkpoint with ``weights_only`` loading and resume exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pipeline.config import TrainHparams

WD_ON = ("all", "weights")


def decayed(name: str, wd_on: str) -> bool:
    """Does weight decay act on parameter ``name``? ``all``: every parameter (neural mechanics,
    neural teleportation, the weight-mask and OpenLTH-derived codebases); ``weights``: only
    parameters whose own name contains "weight" (Godfrey et al.'s modelsym code: biases and
    BatchNorm shifts are not decayed, BatchNorm scales are)."""
    if wd_on not in WD_ON:
        raise ValueError(f"train.wd_on: {wd_on!r} not allowed; allowed: {', '.join(WD_ON)}")
    return wd_on == "all" or "weight" in name.rsplit(".", 1)[-1]


def param_groups(named, h: TrainHparams):
    """The optimizer's parameters from ``(name, parameter)`` pairs: one group with decay
    ``h.wd`` (``wd_on: all``), or a decayed and an undecayed group (``wd_on: weights``)."""
    named = list(dict(named).items())
    if h.wd_on == "all":
        return [p for _, p in named]
    groups = [
        {"params": [p for n, p in named if decayed(n, h.wd_on)], "weight_decay": h.wd},
        {"params": [p for n, p in named if not decayed(n, h.wd_on)], "weight_decay": 0.0},
    ]
    return [g for g in groups if g["params"]]


def make_optimizer(named, h: TrainHparams) -> torch.optim.Optimizer:
    """The run's optimizer over ``named``: ``(name, parameter)`` pairs (or a dict); weight
    decay ``h.wd`` acts on the parameters :func:`decayed` selects."""
    params = param_groups(named, h)
    if h.optimizer == "sgd":
        return torch.optim.SGD(
            params,
            lr=h.lr,
            momentum=h.momentum,
            dampening=h.dampening,
            nesterov=h.nesterov,
            weight_decay=h.wd,
        )
    if h.optimizer == "adam":
        return torch.optim.Adam(
            params, lr=h.lr, betas=(h.beta1, h.beta2), eps=h.adam_eps, weight_decay=h.wd
        )
    raise ValueError(f"train.optimizer: {h.optimizer!r} not allowed; allowed: sgd, adam")


class Schedule:
    """Learning rate per epoch: constant, step, multistep, or reduce-on-plateau."""

    def __init__(self, h: TrainHparams):
        self.h = h
        self.lr = h.lr
        self.best: float | None = None
        self.bad_epochs = 0

    def state_dict(self) -> dict:
        return {"lr": self.lr, "best": self.best, "bad_epochs": self.bad_epochs}

    def load_state_dict(self, state: dict) -> None:
        self.lr, self.best, self.bad_epochs = state["lr"], state["best"], state["bad_epochs"]

    def end_epoch(self, epoch: int, metrics: dict) -> float:
        """Update after epoch ``epoch`` (0-based) finished; return the lr for the next epoch."""
        h, done = self.h, epoch + 1
        if h.schedule == "step":
            self.lr = h.lr * h.gamma ** (done // h.step_size)
        elif h.schedule == "multistep":
            self.lr = h.lr * h.gamma ** sum(done >= m for m in h.milestones)
        elif h.schedule == "plateau":
            value = metrics.get(h.plateau_metric)
            if value is None:
                raise KeyError(
                    f"train.plateau_metric: {h.plateau_metric!r} was not measured "
                    f"(measured: {', '.join(sorted(metrics))}); a val_* metric needs "
                    "dataset.val_fraction > 0"
                )
            better = (
                (lambda a, b: a > b)
                if h.plateau_metric.endswith("accuracy")
                else (lambda a, b: a < b)
            )
            if self.best is None or better(value, self.best):
                self.best, self.bad_epochs = value, 0
            else:
                self.bad_epochs += 1
                if self.bad_epochs > h.plateau_patience:
                    self.lr *= h.plateau_factor
                    self.bad_epochs = 0
        return self.lr

    @staticmethod
    def apply(optimizer: torch.optim.Optimizer, lr: float) -> None:
        for group in optimizer.param_groups:
            group["lr"] = lr


def multi_head_ce(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for ``y [N]`` or, with several heads, ``y [N, H]`` against ``out [N, H*C]``
    (mean over heads)."""
    if y.ndim == 1:
        return F.cross_entropy(out, y)
    n, heads = y.shape
    return F.cross_entropy(out.reshape(n * heads, -1), y.reshape(-1))


def predictions(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example correctness: every head's argmax equals its label (ignored heads aside)."""
    if y.ndim == 1:
        return out.argmax(1) == y
    hit = out.reshape(*y.shape, -1).argmax(-1) == y
    return (hit | (y < 0)).all(1)  # heads labelled -100 (cross-entropy's ignore_index) count


def loss_fn(name: str):
    if name == "ce":
        return multi_head_ce
    if name == "mse":

        def mse(out, y):
            return F.mse_loss(out, F.one_hot(y, out.shape[-1]).to(out.dtype))

        return mse
    raise ValueError(f"train.loss: {name!r} not allowed; allowed: ce, mse")
