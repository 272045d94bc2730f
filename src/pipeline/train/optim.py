"""Optimizers, per-epoch learning-rate schedules and losses, from :class:`TrainHparams`.

The schedules are small explicit state machines (their state is a dict of numbers), so they
checkpoint with ``weights_only`` loading and resume exactly.

:class:`SGD` and :class:`Adam` are ``torch.optim.SGD`` and ``torch.optim.Adam`` (same
hyperparameters, state and ``state_dict`` format, ``isinstance`` holds) without the import of
``torch._dynamo`` (about 2 s, once per process) that torch's optimizers run on construction and on
every step, ``zero_grad`` and ``state_dict``: its decorators ``_disable_dynamo`` and
``_use_grad_for_differentiable`` import it to keep ``torch.compile`` out of the update. On the CPU
(torch's default there is its single-tensor path) their step runs the same tensor operations in the
same order, so parameters and state are bit-identical to torch's; anywhere else (foreach and fused
kernels, accelerators, tensor hyperparameters, ``differentiable``) they call torch's own step.
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


def _undecorated(method):
    """A ``torch.optim.Optimizer`` method without torch's ``_disable_dynamo`` wrapper (recorded
    by ``functools.wraps`` as ``__wrapped__``), or the method itself if it has none."""
    return getattr(method, "__wrapped__", method)


def _plain_group(optimizer, group: dict) -> bool:
    """Does ``group`` take torch's single-tensor path with float hyperparameters, on the CPU?"""
    values = [v for k, v in group.items() if k != "params"]
    values += [x for v in values if isinstance(v, tuple) for x in v]  # Adam's betas
    return (
        getattr(optimizer, "grad_scale", None) is None
        and getattr(optimizer, "found_inf", None) is None
        and not any(group.get(k) for k in ("differentiable", "foreach", "fused", "capturable"))
        and not any(isinstance(v, torch.Tensor) for v in values)
        and all(
            p.grad is None
            or (p.device.type == "cpu" and not p.grad.is_sparse and not p.is_complex())
            for p in group["params"]
        )
    )


class _NoDynamo:
    """The methods torch wraps in ``_disable_dynamo``, run unwrapped (outside ``torch.compile``
    the wrapper does nothing but import ``torch._dynamo``), and a step that runs ``_update`` on
    every group when all groups are plain (:func:`_plain_group`), else torch's own step."""

    def add_param_group(self, param_group: dict) -> None:
        _undecorated(torch.optim.Optimizer.add_param_group)(self, param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        _undecorated(torch.optim.Optimizer.zero_grad)(self, set_to_none)

    def state_dict(self) -> dict:
        return _undecorated(torch.optim.Optimizer.state_dict)(self)

    def load_state_dict(self, state_dict: dict) -> None:
        _undecorated(torch.optim.Optimizer.load_state_dict)(self, state_dict)

    def step(self, closure=None):
        if not all(_plain_group(self, g) for g in self.param_groups):
            torch_step = super().step.__func__
            while getattr(torch_step, "hooked", False):  # torch's profiler hook: ours runs it
                torch_step = torch_step.__wrapped__
            return torch_step(self, closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            for group in self.param_groups:
                self._update(group)
        return loss


class SGD(_NoDynamo, torch.optim.SGD):
    """``torch.optim.SGD`` (see the module docstring): per parameter with a gradient ``g``,
    ``g <- -g`` if maximize; ``g <- g + wd p``; with momentum ``mu`` the buffer ``b <- g`` on its
    first step, else ``b <- mu b + (1 - dampening) g``, and ``g <- g + mu b`` (Nesterov) or
    ``g <- b``; ``p <- p - lr g``."""

    def _update(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:
                continue
            grad = -p.grad if group["maximize"] else p.grad
            if wd != 0:
                grad = grad.add(p, alpha=wd)
            if mu != 0:
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = grad.detach().clone()
                else:
                    buf.mul_(mu).add_(grad, alpha=1 - group["dampening"])
                state["momentum_buffer"] = buf
                grad = grad.add(buf, alpha=mu) if group["nesterov"] else buf
            p.add_(grad, alpha=-lr)


class Adam(_NoDynamo, torch.optim.Adam):
    """``torch.optim.Adam`` (see the module docstring): per parameter with a gradient ``g`` at
    step ``t`` (counted from 1), ``g <- -g`` if maximize; ``g <- g + wd p`` (or ``p <- (1 - lr wd)
    p``, decoupled); ``m <- m + (1 - beta1)(g - m)``; ``v <- beta2 v + (1 - beta2) g^2``
    (``v_max <- max(v_max, v)``, amsgrad); ``p <- p - lr / (1 - beta1^t) m / (sqrt(v) /
    sqrt(1 - beta2^t) + eps)``."""

    def _update(self, group: dict) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                double = torch.get_default_dtype() == torch.float64
                state["step"] = torch.tensor(0.0, dtype=torch.float64 if double else torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format
                    )
            grad = -p.grad if group["maximize"] else p.grad
            exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
            state["step"] += 1
            if wd != 0:
                if group["decoupled_weight_decay"]:
                    p.mul_(1 - lr * wd)
                else:
                    grad = grad.add(p, alpha=wd)
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = state["step"].item()
            step_size = lr / (1 - beta1**step)
            bias_correction2_sqrt = (1 - beta2**step) ** 0.5
            if group["amsgrad"]:
                second = state["max_exp_avg_sq"]
                torch.maximum(second, exp_avg_sq, out=second)
            else:
                second = exp_avg_sq
            denom = (second.sqrt() / bias_correction2_sqrt).add_(eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)


def make_optimizer(named, h: TrainHparams) -> torch.optim.Optimizer:
    """The run's optimizer over ``named``: ``(name, parameter)`` pairs (or a dict); weight
    decay ``h.wd`` acts on the parameters :func:`decayed` selects."""
    params = param_groups(named, h)
    if h.optimizer == "sgd":
        return SGD(
            params,
            lr=h.lr,
            momentum=h.momentum,
            dampening=h.dampening,
            nesterov=h.nesterov,
            weight_decay=h.wd,
        )
    if h.optimizer == "adam":
        return Adam(params, lr=h.lr, betas=(h.beta1, h.beta2), eps=h.adam_eps, weight_decay=h.wd)
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


@torch.no_grad()
def evaluate(model, split, loss=multi_head_ce, batch_size: int = 1024) -> tuple[float, float]:
    """Mean loss and accuracy of ``model`` (eval mode) over a split."""
    was = model.training
    model.eval()
    total, correct, n = 0.0, 0, 0
    for x, y in split.eval_batches(batch_size):
        out = model(x)
        total += float(loss(out, y)) * len(y)
        correct += int(predictions(out, y).sum())
        n += len(y)
    model.train(was)
    return total / max(n, 1), correct / max(n, 1)
