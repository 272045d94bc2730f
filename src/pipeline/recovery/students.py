"""Expand: N overparameterised students fitted to the teacher's outputs in one tensor program.

All N networks live in one flat buffer ``[N, P]`` (views give each layer ``[N, out, in]``); a
minibatch ``x [B, d]`` is shared, the outputs are ``[N, B, o]`` and the loss is the *sum* of the
per-student MSEs ``L_n = mean_{b,o} (f_n(x_b)_o - y_bo)^2``, so each student's gradient is its
own. Adam runs on the whole buffer with a learning rate per student (``lr [N, 1]``), which makes
Adam's update of every student exactly the one separate training would make, and lets every
student have its own reduce-on-plateau schedule (on its epoch-mean loss: factor, patience,
cooldown, relative threshold, as torch's ``ReduceLROnPlateau``) and stop on its own once a
reduction would take its learning rate below ``min_lr`` (its parameters freeze). A student whose
loss turns NaN/inf is stopped and reported as diverged; the others go on.

Resumable: every ``checkpoint_every`` epochs the buffer, Adam's moments, the schedules and the
logged rows are saved (``torch.save``; loaded with ``weights_only=True``); the batch order of
epoch ``e`` derives from ``(seed, e)``, so a resumed fit ends bit-identical on the CPU.

A single network can instead be finetuned full-batch with L-BFGS (strong Wolfe line search):
the precise end of a reconstruction, where the data are small.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import io, seeding
from pipeline.recovery.chain import Chain, flatten, forward, init_stack, unflatten
from pipeline.recovery.teachers import ProbeData

STATUS = ("converged", "max_epochs", "diverged")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitHparams:
    """How a stack of networks is fitted (students, or a reconstruction's finetuning)."""

    optimizer: str = "adam"  # adam | lbfgs (lbfgs: one network, full batch)
    lr: float = 1e-3  # lbfgs: the initial step length (1 is the usual choice)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    batch_size: int = 512  # 0: full batch
    max_epochs: int = 25_000
    plateau_factor: float = 10**-0.5
    plateau_patience: int = 100
    plateau_cooldown: int = 200
    plateau_threshold: float = 0.0
    min_lr: float = 1e-7
    log_every: int = 100
    checkpoint_every: int = 1000
    tolerance: float = 1e-12  # lbfgs: stop when the loss changes less than this


@dataclass(frozen=True)
class ExpandHparams:
    students: int = 10
    rho: float = 4.0
    seed: int = 0
    fit: FitHparams = field(default_factory=FitHparams)

    @classmethod
    def from_dict(cls, raw: dict, where: str = "expand") -> ExpandHparams:
        raw = dict(raw)
        fit = FitHparams(**checked_keys(FitHparams, raw.pop("fit", {}), f"{where}.fit"))
        return cls(**checked_keys(cls, raw, where), fit=fit)


def checked_keys(cls, raw: dict, where: str) -> dict:
    """``raw`` if all its keys are fields of dataclass ``cls``; else a ``KeyError`` naming them."""
    allowed = set(cls.__dataclass_fields__)
    unknown = sorted(set(raw) - allowed)
    if unknown:
        raise KeyError(f"{where}: unknown keys {unknown}; allowed: {sorted(allowed)}")
    return raw


@dataclass
class FitResult:
    params: dict  # stacked {name: [N, *shape]}
    train_loss: torch.Tensor  # [N], full training set, after the fit
    test_loss: torch.Tensor  # [N], held-out probe set
    status: list[str]  # per network: converged | max_epochs | diverged
    epochs: int
    history: pd.DataFrame  # epoch, student, loss (epoch mean), test_loss, lr
    kept: dict | None = None  # the weights after ``keep_epoch`` epochs, when asked for

    def ranking(self) -> torch.Tensor:
        """Networks from best to worst training loss (diverged ones last)."""
        loss = torch.nan_to_num(self.train_loss, nan=math.inf)
        return torch.argsort(loss, stable=True)


class StackedAdam:
    """Adam on a ``[N, P]`` buffer with a learning rate per row (torch.optim.Adam's update)."""

    def __init__(self, like: torch.Tensor, beta1=0.9, beta2=0.999, eps=1e-8):
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = 0
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    @torch.no_grad()
    def step(self, flat: torch.Tensor, grad: torch.Tensor, lr: torch.Tensor, active: torch.Tensor):
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        denom = (self.v.sqrt() / math.sqrt(1 - b2**self.t)).add_(self.eps)
        step = self.m / denom * (lr / (1 - b1**self.t))[:, None]
        flat.sub_(torch.where(active[:, None], step, torch.zeros_like(step)))

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.m.copy_(state["m"])
        self.v.copy_(state["v"])
        self.t = int(state["t"])


class StackedPlateau:
    """Reduce-on-plateau per network, on its epoch-mean loss; a network stops once a reduction
    would take its learning rate below ``min_lr``."""

    def __init__(self, n: int, h: FitHparams, dtype, device):
        self.h = h
        self.lr = torch.full((n,), h.lr, dtype=dtype, device=device)
        self.best = torch.full((n,), math.inf, dtype=dtype, device=device)
        self.bad = torch.zeros(n, dtype=torch.long, device=device)
        self.cooldown = torch.zeros(n, dtype=torch.long, device=device)
        self.active = torch.ones(n, dtype=torch.bool, device=device)
        self.status = torch.full((n,), STATUS.index("max_epochs"), dtype=torch.long, device=device)

    def update(self, loss: torch.Tensor) -> None:
        h = self.h
        finite = torch.isfinite(loss)
        diverged = self.active & ~finite
        self.status[diverged] = STATUS.index("diverged")
        improved = loss < self.best * (1 - h.plateau_threshold)
        self.best = torch.where(improved & finite, loss, self.best)
        self.bad = torch.where(improved, 0, self.bad + 1)
        cooling = self.cooldown > 0
        self.cooldown = torch.where(cooling, self.cooldown - 1, self.cooldown)
        self.bad = torch.where(cooling, 0, self.bad)
        reduce = self.active & (self.bad > h.plateau_patience)
        new_lr = torch.where(reduce, self.lr * h.plateau_factor, self.lr)
        done = reduce & (new_lr < h.min_lr)
        self.status[done] = STATUS.index("converged")
        self.lr = torch.where(reduce & ~done, new_lr, self.lr)
        self.cooldown = torch.where(reduce, h.plateau_cooldown, self.cooldown)
        self.bad = torch.where(reduce, 0, self.bad)
        self.active = self.active & ~done & ~diverged
        self.status[self.active] = STATUS.index("max_epochs")

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("lr", "best", "bad", "cooldown", "active", "status")}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v.to(getattr(self, k).device))


def per_network_mse(chain: Chain, params: dict, x, y, batch: int = 65536) -> torch.Tensor:
    """``[N]`` mean squared error of every network over ``(x, y)``."""
    total = None
    with torch.no_grad():
        for i in range(0, len(x), batch):
            err = ((forward(chain, params, x[i : i + batch]) - y[i : i + batch]) ** 2).sum((1, 2))
            total = err if total is None else total + err
    return total / (len(x) * y.shape[1])


def fingerprint(*parts) -> str:
    text = json.dumps(
        [p if not hasattr(p, "__dataclass_fields__") else asdict(p) for p in parts],
        sort_keys=True,
        default=str,
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def fit(
    chain: Chain,
    params: dict,
    data: ProbeData,
    h: FitHparams,
    seed: int = 0,
    resume: str | Path | None = None,
    masks: dict | None = None,
    tag: str = "",
    start_epoch: int = 0,
    keep_epoch: int | None = None,
) -> FitResult:
    """Fit the stacked networks ``params`` to ``data`` (MSE); see the module docstring.

    ``masks``: ``{name: 0/1 tensor like params[name]}`` (pruning): masked entries are zeroed and
    stay zero. ``resume``: file for the resume state (``None``: no checkpoints). ``start_epoch``:
    the first epoch's index (its batch order; a rewound lottery level goes on from there).
    ``keep_epoch``: also return the weights after that many epochs (``FitResult.kept``).
    """
    if h.optimizer == "lbfgs":
        return _fit_lbfgs(chain, params, data, h, masks)
    if h.optimizer != "adam":
        raise ValueError(f"fit.optimizer: {h.optimizer!r} not allowed; allowed: adam, lbfgs")
    flat = flatten(chain, params).detach().clone()
    n = flat.shape[0]
    mask_flat = flatten(chain, _full_masks(chain, params, masks)).to(flat.dtype) if masks else None
    if mask_flat is not None:
        flat.mul_(mask_flat)
    adam = StackedAdam(flat, h.beta1, h.beta2, h.eps)
    sched = StackedPlateau(n, h, flat.dtype, flat.device)
    rows: list[np.ndarray] = []
    size = len(data.x)
    batch = size if h.batch_size <= 0 else min(h.batch_size, size)
    per_epoch = size // batch
    key = fingerprint(chain, h, seed, tag, n, size, float(data.y.sum()), masks is not None)
    epoch, kept = _load(resume, key, flat, adam, sched, rows) if resume else (0, None)
    epoch = epoch or start_epoch
    if keep_epoch == epoch:
        kept = _snapshot(chain, flat)
    flat.requires_grad_(True)
    while epoch < h.max_epochs and bool(sched.active.any()):
        if batch < size:
            order = torch.randperm(size, generator=seeding.generator(seed, "order", tag, epoch))
            order = order.to(data.x.device)
        total = torch.zeros(n, dtype=flat.dtype, device=flat.device)
        for b in range(per_epoch):
            if batch == size:
                xb, yb = data.x, data.y
            else:
                idx = order[b * batch : (b + 1) * batch]
                xb, yb = data.x[idx], data.y[idx]
            per = ((forward(chain, unflatten(chain, flat), xb) - yb) ** 2).mean((1, 2))
            (grad,) = torch.autograd.grad(per.sum(), flat)
            if mask_flat is not None:
                grad = grad * mask_flat
            adam.step(flat, grad, sched.lr, sched.active)
            total += per.detach()
        mean_loss = total / per_epoch
        sched.update(mean_loss)
        epoch += 1
        if epoch % h.log_every == 0 or not bool(sched.active.any()) or epoch == h.max_epochs:
            rows.append(_log_rows(chain, flat, data, epoch, mean_loss, sched.lr))
        if resume and epoch % h.checkpoint_every == 0:
            _save(resume, key, epoch, flat.detach(), adam, sched, rows, kept)
        if epoch == keep_epoch:
            kept = _snapshot(chain, flat)
    final = _snapshot(chain, flat)
    return FitResult(
        final,
        per_network_mse(chain, final, data.x, data.y),
        per_network_mse(chain, final, data.x_test, data.y_test),
        [STATUS[i] for i in sched.status.tolist()],
        epoch,
        _history(rows),
        kept,
    )


def _snapshot(chain: Chain, flat: torch.Tensor) -> dict:
    return {k: v.clone() for k, v in unflatten(chain, flat.detach()).items()}


def _full_masks(chain: Chain, params: dict, masks: dict) -> dict:
    unknown = set(masks) - set(params)
    if unknown:
        raise KeyError(f"masks for unknown parameters {sorted(unknown)}")
    return {k: masks.get(k, torch.ones_like(params[k])) for k in chain.shapes()}


def _log_rows(chain, flat, data, epoch, loss, lr) -> np.ndarray:
    params = unflatten(chain, flat.detach())
    test = per_network_mse(chain, params, data.x_test, data.y_test)
    n = len(loss)
    return np.stack(
        [np.full(n, epoch), np.arange(n), loss.cpu().numpy(), test.cpu().numpy(), lr.cpu().numpy()],
        axis=1,
    )


def _history(rows) -> pd.DataFrame:
    arr = np.concatenate(rows) if rows else np.zeros((0, 5))
    return pd.DataFrame(
        {
            "epoch": arr[:, 0].astype(np.int64),
            "student": arr[:, 1].astype(np.int64),
            "loss": arr[:, 2],
            "test_loss": arr[:, 3],
            "lr": arr[:, 4],
        }
    )


def _save(path, key, epoch, flat, adam, sched, rows, kept) -> None:
    io.save_torch(
        path,
        {
            "fingerprint": key,
            "epoch": epoch,
            "flat": flat,
            "adam": adam.state_dict(),
            "plateau": sched.state_dict(),
            "rows": torch.from_numpy(np.concatenate(rows)) if rows else None,
            "kept": kept,
        },
    )


def _load(path, key, flat, adam, sched, rows) -> tuple[int, dict | None]:
    """Restore the resume state in ``path`` if it was written for ``key``: ``(epoch, kept)``."""
    if not Path(path).is_file():
        return 0, None
    try:
        state = io.load_torch(path)
    except io.ArtifactError as err:
        log.warning("ignoring unusable resume state: %s", err)
        return 0, None
    if state.get("fingerprint") != key:
        log.warning("%s: resume state of other hyperparameters; starting over", path)
        return 0, None
    flat.copy_(state["flat"])
    adam.load_state_dict(state["adam"])
    sched.load_state_dict(state["plateau"])
    if state["rows"] is not None:
        rows.append(state["rows"].numpy())
    return int(state["epoch"]), state["kept"]


def _fit_lbfgs(chain: Chain, params: dict, data: ProbeData, h: FitHparams, masks) -> FitResult:
    """Full-batch L-BFGS of one network (strong Wolfe), ``max_epochs`` outer iterations of at
    most 20 function evaluations each, until the loss changes by less than ``tolerance``."""
    flat = flatten(chain, params).detach().clone()
    if flat.shape[0] != 1:
        raise ValueError("fit.optimizer lbfgs fits one network; use adam for a stack")
    mask_flat = flatten(chain, _full_masks(chain, params, masks)).to(flat.dtype) if masks else None
    if mask_flat is not None:
        flat.mul_(mask_flat)
    flat.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [flat],
        lr=h.lr,
        max_iter=20,
        history_size=50,
        tolerance_grad=0.0,
        tolerance_change=0.0,
        line_search_fn="strong_wolfe",
    )

    def closure():
        opt.zero_grad()
        loss = ((forward(chain, unflatten(chain, flat), data.x) - data.y) ** 2).mean()
        loss.backward()
        if mask_flat is not None:
            flat.grad.mul_(mask_flat)
        return loss

    rows, previous, status, done = [], math.inf, "max_epochs", 0
    for done in range(1, h.max_epochs + 1):
        loss = float(opt.step(closure).detach())
        if not math.isfinite(loss):
            status = "diverged"
            break
        if done % h.log_every == 0:
            rows.append(
                _log_rows(chain, flat, data, done, torch.tensor([loss]), torch.tensor([h.lr]))
            )
        if abs(previous - loss) <= h.tolerance * max(loss, 1e-300) or loss == 0.0:
            status = "converged"
            break
        previous = loss
    rows.append(_log_rows(chain, flat, data, done, torch.tensor([loss]), torch.tensor([h.lr])))
    final = {k: v.detach().clone() for k, v in unflatten(chain, flat.detach()).items()}
    return FitResult(
        final,
        per_network_mse(chain, final, data.x, data.y),
        per_network_mse(chain, final, data.x_test, data.y_test),
        [status],
        done,
        _history(rows),
    )


def student_chain(teacher: Chain, rho: float) -> Chain:
    """The students' architecture: every hidden width x ``rho`` (rounded up)."""
    return teacher.with_widths(math.ceil(rho * w) for w in teacher.widths)


def train_students(
    teacher: Chain, data: ProbeData, h: ExpandHparams, resume=None, dtype=torch.float64
) -> tuple[Chain, FitResult]:
    """Initialise ``h.students`` students (``mlp`` init, student n from ``(seed, n)``) of width
    ``rho`` x the teacher's and fit them; ``(student chain, result)``."""
    chain = student_chain(teacher, h.rho)
    params = init_stack(chain, h.students, h.seed, dtype)
    params = {k: v.to(data.x.device) for k, v in params.items()}
    return chain, fit(chain, params, data, h.fit, h.seed, resume, tag="students")
