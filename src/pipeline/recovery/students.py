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

The Adam fit is a task on the training engine (:class:`StudentsTask` on
:class:`pipeline.train.engine.Engine`): an epoch is ``n // batch`` minibatch steps, the
schedules update at its end. Resumable: every ``checkpoint_every`` epochs the engine saves the
buffer, Adam's moments, the schedules, the logged rows and the kept weights in its one
resume-state format (a :class:`~pipeline.train.engine.ResumeStore` folder, the newest state
kept); a stop request (SIGTERM) saves mid-epoch and raises ``TrainingStopped``. The batch order
of epoch ``e`` derives from ``(seed, e)``, so a resumed fit ends bit-identical on the CPU.

Full-batch L-BFGS (``optimizer: lbfgs``) is the precise end of a fit, where the data are small:
for one network torch's L-BFGS with a strong Wolfe line search; for a stack, a batched L-BFGS
(:func:`_fit_lbfgs_stack`): every network keeps its own curvature pairs and its own
backtracking (Armijo) step, evaluated for all networks in one pass. It is not checkpointed (it
is short); a killed job repeats it from the Adam stage's resumed end.

``frozen``: parameters whose gradient is zeroed (the recovered layers of a reconstruction, which
every student shares, while its upper layers are refitted).
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

from pipeline import devices, seeding
from pipeline.config import checked_block, from_block
from pipeline.recovery.chain import (
    Chain,
    StackedMSE,
    flatten,
    forward,
    init_stack,
    layout,
    unflatten,
)
from pipeline.recovery.teachers import ProbeData
from pipeline.train.engine import Engine, ResumeStore

STATUS = ("converged", "max_epochs", "diverged", "behind")
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FitHparams:
    """How a stack of networks is fitted (students, or a reconstruction's finetuning)."""

    optimizer: str = "adam"  # adam | lbfgs | lm (lbfgs, lm: full batch; lm: one network)
    lr: float = 1e-3  # lbfgs: the initial step length (1 is the usual choice)
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    batch_size: int = 512  # 0: full batch
    max_epochs: int = 25_000  # lm: evaluations of the residuals
    plateau_factor: float = 10**-0.5
    plateau_patience: int = 100
    plateau_cooldown: int = 200
    plateau_threshold: float = 0.0
    min_lr: float = 1e-7
    log_every: int = 100
    checkpoint_every: int = 1000
    tolerance: float = 1e-12  # lbfgs: stop when the loss changes less than this (lm: the
    # relative reduction of the loss and the relative step; MINPACK's ftol and xtol)
    floor: float = 1e-12  # lbfgs: stop once the loss is below this x mean(y^2)
    # lbfgs (a stack): a network whose loss is above this x the best one's stops (null: never)
    behind: float | None = None
    skip_lr_factor: float = 1.0  # adam: learning rate of skip weights x this (published: 10)


@dataclass(frozen=True)
class ExpandHparams:
    """The students: ``students`` networks ``rho`` x wider than the teacher, fitted in ``dtype``
    by ``fit`` and then, if given, by ``polish`` (e.g. a stacked L-BFGS from where Adam ended)
    in ``polish_dtype``: float64 by default, so that a float32 Adam stage (fast) ends in a
    float64 fit, from the probe data as given (not their float32 rounding). On the two-layer
    deep family the two polishes reach the same losses, and the float64 one's students are
    recovered on 22 of 24 problems against 20 (README, recovery section)."""

    students: int = 10
    rho: float = 4.0
    seed: int = 0
    dtype: str = "float64"
    fit: FitHparams = field(default_factory=FitHparams)
    polish: FitHparams | None = None
    polish_dtype: str = "float64"

    @classmethod
    def from_dict(cls, raw: dict, where: str = "expand") -> ExpandHparams:
        raw = dict(raw)
        fit = from_block(FitHparams, raw.pop("fit", {}), f"{where}.fit")
        polish = raw.pop("polish", None)
        if polish is not None:
            polish = from_block(FitHparams, polish, f"{where}.polish")
        h = cls(**checked_block(cls, raw, where), fit=fit, polish=polish)
        devices.dtype(h.dtype, f"{where}.dtype")  # a clear error for any other name
        devices.dtype(h.polish_dtype, f"{where}.polish_dtype")
        return h


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

    def select(self, index) -> FitResult:
        """The networks ``index`` (a sequence of positions), in that order; no history."""
        index = [int(i) for i in index]
        pick = torch.tensor(index, dtype=torch.long)
        return FitResult(
            {k: v[pick.to(v.device)] for k, v in self.params.items()},
            self.train_loss[pick.to(self.train_loss.device)],
            self.test_loss[pick.to(self.test_loss.device)],
            [self.status[i] for i in index],
            self.epochs,
            pd.DataFrame(),
        )


class StackedAdam:
    """Adam on a ``[N, P]`` buffer with a learning rate per row (torch.optim.Adam's update)."""

    def __init__(self, like: torch.Tensor, beta1=0.9, beta2=0.999, eps=1e-8):
        self.m = torch.zeros_like(like)
        self.v = torch.zeros_like(like)
        self.t = 0
        self.beta1, self.beta2, self.eps = beta1, beta2, eps

    @torch.no_grad()
    def step(
        self,
        flat: torch.Tensor,
        grad: torch.Tensor,
        lr: torch.Tensor,
        active: torch.Tensor,
        lr_scale: torch.Tensor | None = None,
        all_active: bool = False,
    ):
        """One Adam step of the active rows (``all_active``: every row, known to the caller);
        ``lr_scale [P]``: a learning-rate factor per column."""
        self.t += 1
        b1, b2 = self.beta1, self.beta2
        self.m.mul_(b1).add_(grad, alpha=1 - b1)
        self.v.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        step = self.v.sqrt().div_(math.sqrt(1 - b2**self.t)).add_(self.eps)
        torch.div(self.m, step, out=step).mul_((lr / (1 - b1**self.t))[:, None])
        if lr_scale is not None:
            step.mul_(lr_scale)
        if not all_active:
            step.masked_fill_(~active[:, None], 0)
        flat.sub_(step)

    def state_dict(self) -> dict:
        return {"m": self.m, "v": self.v, "t": self.t}

    def load_state_dict(self, state: dict) -> None:
        self.m.copy_(state["m"])
        self.v.copy_(state["v"])
        self.t = int(state["t"])


class StackedPlateau:
    """Reduce-on-plateau per network, on its epoch-mean loss; a network stops once a reduction
    would take its learning rate below ``min_lr``. The state is ``[N]`` numpy arrays on the host
    (``lr`` and ``best`` in the fit's dtype: the arithmetic of torch's tensors); :meth:`tensors`
    gives the learning rates and the active mask on the fit's device."""

    KEYS = ("lr", "best", "bad", "cooldown", "active", "status")

    def __init__(self, n: int, h: FitHparams, dtype, device):
        self.h, self.device = h, torch.device(device)
        real = torch.empty(0, dtype=dtype).numpy().dtype
        self.lr = np.full(n, h.lr, dtype=real)
        self.best = np.full(n, math.inf, dtype=real)
        self.bad = np.zeros(n, dtype=np.int64)
        self.cooldown = np.zeros(n, dtype=np.int64)
        self.active = np.ones(n, dtype=bool)
        self.status = np.full(n, STATUS.index("max_epochs"), dtype=np.int64)
        self._tensors = None

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(lr [N], active [N])`` on the device (cached until an update changes them)."""
        if self._tensors is None:
            self._tensors = tuple(
                torch.from_numpy(a.copy()).to(self.device) for a in (self.lr, self.active)
            )
        return self._tensors

    def update(self, loss) -> None:
        h = self.h
        loss = loss.detach().cpu().numpy() if torch.is_tensor(loss) else np.asarray(loss)
        lr, active = self.lr, self.active
        finite = np.isfinite(loss)
        diverged = self.active & ~finite
        self.status[diverged] = STATUS.index("diverged")
        improved = loss < self.best * (1 - h.plateau_threshold)
        self.best = np.where(improved & finite, loss, self.best)
        self.bad = np.where(improved, 0, self.bad + 1)
        cooling = self.cooldown > 0
        self.cooldown = np.where(cooling, self.cooldown - 1, self.cooldown)
        self.bad = np.where(cooling, 0, self.bad)
        reduce = self.active & (self.bad > h.plateau_patience)
        new_lr = np.where(reduce, self.lr * h.plateau_factor, self.lr)
        done = reduce & (new_lr < h.min_lr)
        self.status[done] = STATUS.index("converged")
        self.lr = np.where(reduce & ~done, new_lr, self.lr)
        self.cooldown = np.where(reduce, h.plateau_cooldown, self.cooldown)
        self.bad = np.where(reduce, 0, self.bad)
        self.active = self.active & ~done & ~diverged
        self.status[self.active] = STATUS.index("max_epochs")
        if not (np.array_equal(lr, self.lr) and np.array_equal(active, self.active)):
            self._tensors = None

    def state_dict(self) -> dict:
        return {k: torch.from_numpy(np.array(getattr(self, k))) for k in self.KEYS}

    def load_state_dict(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v.detach().cpu().numpy().astype(getattr(self, k).dtype))
        self._tensors = None


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


class StudentsTask:
    """The stacked students' step on the training engine (:mod:`pipeline.train.engine`).

    An epoch is ``steps_per_epoch = n // batch`` minibatch steps (a remainder of the data is
    left out; ``batch = n``: full batch) in the order ``randperm(n)`` drawn from ``(seed,
    "order", tag, epoch)``; a step is :class:`StackedMSE`'s loss and gradient of the batch
    (``x [B, d]``, ``y [B, o]``), the gradient times ``grad_mask [N, P]`` and one
    :class:`StackedAdam` step with the learning rates and active rows the schedule had at the
    epoch's start. ``end_epoch``: the schedule's update on the epoch-mean losses, a history row
    per student every ``log_every`` epochs (and at the end), the weights at ``keep_epoch``.
    ``finished``: no student is active. The resume state carries the buffer, Adam's moments,
    the schedule, the rows, the kept weights and the epoch's loss sum so far."""

    def __init__(
        self,
        chain: Chain,
        flat: torch.Tensor,
        data: ProbeData,
        h: FitHparams,
        seed: int,
        tag: str,
        grad_mask: torch.Tensor | None,
        lr_scale: torch.Tensor | None,
        keep_epoch: int | None,
        start_epoch: int,
    ):
        self.chain, self.flat, self.data, self.h = chain, flat, data, h
        self.seed, self.tag, self.grad_mask, self.lr_scale = seed, tag, grad_mask, lr_scale
        self.keep_epoch = keep_epoch
        size = len(data.x)
        self.size = size
        self.batch = size if h.batch_size <= 0 else min(h.batch_size, size)
        self.steps_per_epoch = size // self.batch
        self.adam = StackedAdam(flat, h.beta1, h.beta2, h.eps)
        self.sched = StackedPlateau(flat.shape[0], h, flat.dtype, flat.device)
        self.loss_grad = StackedMSE(chain)
        self.rows: list[np.ndarray] = []
        self.total = None  # [N] sum of this epoch's batch losses so far
        self.kept = _snapshot(chain, flat) if keep_epoch == start_epoch else None

    def batches(self, epoch: int, start: int):
        data, size, batch = self.data, self.size, self.batch
        if batch < size:
            order = torch.randperm(
                size, generator=seeding.generator(self.seed, "order", self.tag, epoch)
            )
            order = order.to(data.x.device)
        self.lr, self.active = self.sched.tensors()
        self.all_active = bool(self.sched.active.all())
        for b in range(start, self.steps_per_epoch):
            if batch == size:
                yield data.x, data.y
            else:
                idx = order[b * batch : (b + 1) * batch]
                yield data.x[idx], data.y[idx]

    def forward_backward(self, batch) -> torch.Tensor:
        per, self.grad = self.loss_grad(self.flat, *batch)
        if self.grad_mask is not None:
            self.grad.mul_(self.grad_mask)
        self.total = per if self.total is None else self.total + per
        return per

    def update(self) -> None:
        self.adam.step(self.flat, self.grad, self.lr, self.active, self.lr_scale, self.all_active)

    def end_epoch(self, epoch: int) -> dict:
        h, sched = self.h, self.sched
        mean_loss, self.total = self.total / self.steps_per_epoch, None
        sched.update(mean_loss)
        done = epoch + 1
        if done % h.log_every == 0 or not sched.active.any() or done == h.max_epochs:
            self.rows.append(_log_rows(self.chain, self.flat, self.data, done, mean_loss, sched.lr))
        if done == self.keep_epoch:
            self.kept = _snapshot(self.chain, self.flat)
        return {}

    def finished(self) -> bool:
        return not self.sched.active.any()

    def state_dict(self) -> dict:
        return {
            "flat": self.flat.detach(),
            "adam": self.adam.state_dict(),
            "plateau": self.sched.state_dict(),
            "rows": torch.from_numpy(np.concatenate(self.rows)) if self.rows else None,
            "kept": self.kept,
            "epoch_loss": self.total,
        }

    def load_state_dict(self, state: dict) -> None:
        self.flat.copy_(state["flat"])
        self.adam.load_state_dict(state["adam"])
        self.sched.load_state_dict(state["plateau"])
        self.rows = [] if state["rows"] is None else [state["rows"].numpy()]
        self.kept, self.total = state["kept"], state["epoch_loss"]


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
    frozen=(),
) -> FitResult:
    """Fit the stacked networks ``params`` to ``data`` (MSE); see the module docstring.

    ``masks``: ``{name: 0/1 tensor like params[name]}`` (pruning): masked entries are zeroed and
    stay zero. ``resume``: folder of the resume states (a :class:`ResumeStore`, the newest
    kept; ``None``: no checkpoints). ``start_epoch``: the first epoch's index (its batch order;
    a rewound lottery level goes on from there). ``keep_epoch``: also return the weights after
    that many epochs (``FitResult.kept``). ``frozen``: names of parameters that keep their
    values (zero gradient).
    """
    if h.optimizer not in ("adam", "lbfgs", "lm"):
        raise ValueError(f"fit.optimizer: {h.optimizer!r} not allowed; allowed: adam, lbfgs, lm")
    if h.behind is not None and not h.behind >= 1:
        raise ValueError(f"fit.behind: {h.behind} must be at least 1 (or null)")
    unknown = set(frozen) - set(chain.shapes())
    if unknown:
        raise KeyError(f"frozen: unknown parameters {sorted(unknown)}")
    if resume is not None and h.optimizer == "adam" and h.checkpoint_every < 1:
        raise ValueError(f"fit.checkpoint_every: {h.checkpoint_every} must be at least 1")
    mask_flat = flatten(chain, _full_masks(chain, params, masks)) if masks else None
    grad_mask = _grad_mask(chain, params, mask_flat, frozen)
    if h.optimizer == "lm":
        if next(iter(params.values())).shape[0] != 1:
            raise ValueError("fit.optimizer: lm fits one network, not a stack")
        return _fit_lm(chain, params, data, h, mask_flat, grad_mask)
    if h.optimizer == "lbfgs":
        if next(iter(params.values())).shape[0] == 1:
            return _fit_lbfgs(chain, params, data, h, mask_flat, grad_mask)
        return _fit_lbfgs_stack(chain, params, data, h, mask_flat, grad_mask)
    flat = flatten(chain, params).detach().clone()
    if mask_flat is not None:
        flat.mul_(mask_flat.to(flat.dtype))
    lr_scale = _lr_scale(chain, flat, h.skip_lr_factor)
    task = StudentsTask(
        chain, flat, data, h, seed, tag, grad_mask, lr_scale, keep_epoch, start_epoch
    )
    per_epoch = task.steps_per_epoch
    store, save_steps = None, ()
    if resume is not None:
        store = ResumeStore(Path(resume), keep_last=1)
        save_steps = range(
            h.checkpoint_every * per_epoch,
            h.max_epochs * per_epoch + 1,
            h.checkpoint_every * per_epoch,
        )
    key = fingerprint(
        chain, h, seed, tag, flat.shape[0], task.size, float(data.y.sum()), masks is not None
    )
    run = Engine(
        task,
        h.max_epochs,
        store,
        save_steps,
        fingerprint=key,
        where=f"fit {tag or 'students'}" if resume is None else str(resume),
        start=(start_epoch, 0, start_epoch * per_epoch),
    ).run()
    final = _snapshot(chain, flat)
    return FitResult(
        final,
        per_network_mse(chain, final, data.x, data.y),
        per_network_mse(chain, final, data.x_test, data.y_test),
        [STATUS[i] for i in task.sched.status.tolist()],
        run.epoch,
        _history(task.rows),
        task.kept,
    )


def _snapshot(chain: Chain, flat: torch.Tensor) -> dict:
    return {k: v.clone() for k, v in unflatten(chain, flat.detach()).items()}


def _grad_mask(chain: Chain, params: dict, mask_flat, frozen) -> torch.Tensor | None:
    """``[N, P]`` (or None) factor of the gradient: pruned entries and frozen parameters 0."""
    dtype = next(iter(params.values())).dtype
    if not frozen:
        return None if mask_flat is None else mask_flat.to(dtype)
    like = {k: torch.ones_like(v) for k, v in params.items()}
    for name in frozen:
        like[name] = torch.zeros_like(params[name])
    mask = flatten(chain, like)
    return mask if mask_flat is None else mask * mask_flat.to(dtype)


def _lr_scale(chain: Chain, flat: torch.Tensor, skip_factor: float) -> torch.Tensor | None:
    """``[P]`` learning-rate factors: ``skip_factor`` on skip weights, 1 elsewhere."""
    if skip_factor == 1.0 or not chain.skips:
        return None
    scale = torch.ones(flat.shape[1], dtype=flat.dtype, device=flat.device)
    for name, (offset, shape) in layout(chain).items():
        if name.startswith("skip."):
            scale[offset : offset + int(torch.Size(shape).numel())] = skip_factor
    return scale


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
        [np.full(n, epoch), np.arange(n), _numpy(loss), _numpy(test), _numpy(lr)], axis=1
    )


def _numpy(v) -> np.ndarray:
    return v.detach().cpu().numpy() if torch.is_tensor(v) else np.asarray(v)


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


def _fit_lbfgs(
    chain: Chain, params: dict, data: ProbeData, h: FitHparams, mask_flat, grad_mask
) -> FitResult:
    """Full-batch L-BFGS of one network (strong Wolfe), ``max_epochs`` outer iterations of at
    most 20 function evaluations each, until the loss changes by less than ``tolerance`` or
    falls below ``floor`` x mean(y^2)."""
    flat = flatten(chain, params).detach().clone()
    if mask_flat is not None:
        flat.mul_(mask_flat.to(flat.dtype))
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

    loss_grad = StackedMSE(chain)

    def closure():
        loss, grad = loss_grad(flat.detach(), data.x, data.y)
        if grad_mask is not None:
            grad.mul_(grad_mask)
        flat.grad = grad
        return loss[0]

    rows, previous, status, done = [], math.inf, "max_epochs", 0
    floor = h.floor * float((data.y**2).mean())
    for done in range(1, h.max_epochs + 1):
        loss = float(opt.step(closure).detach())
        if not math.isfinite(loss):
            status = "diverged"
            break
        if done % h.log_every == 0:
            rows.append(
                _log_rows(chain, flat, data, done, torch.tensor([loss]), torch.tensor([h.lr]))
            )
        if abs(previous - loss) <= h.tolerance * max(loss, 1e-300) or loss <= floor:
            status = "converged"
            break
        previous = loss
    if not rows or rows[-1][0, 0] != done:  # the last iteration, unless logged in the loop
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


def _fit_lm(
    chain: Chain, params: dict, data: ProbeData, h: FitHparams, mask_flat, grad_mask
) -> FitResult:
    """Levenberg-Marquardt of one network: the MSE is a sum of squares ``|r(theta)|^2 / (n o)``
    of the residuals ``r = f(x) - y [n o]``, solved as such (Gauss-Newton steps ``(J^T J +
    lambda D) d = -J^T r`` with the trust-region damping ``lambda`` of MINPACK, by
    ``scipy.optimize.least_squares``; ``trf`` when there are fewer residuals than free
    parameters) over the free parameters (neither masked nor frozen), the Jacobian ``[n o,
    P_free]`` exact by forward-mode autodiff (reverse mode when ``P > n o``). Where the
    residual is zero at the minimum (a reconstruction of the teacher itself) Gauss-Newton
    converges quadratically whatever the conditioning, whereas a quasi-Newton fit stalls in
    the flat valleys that nearly linear neurons make. At most ``max_epochs`` evaluations of
    ``r``; ``tolerance``: MINPACK's ``ftol`` and ``xtol``."""
    from scipy.optimize import least_squares

    base = flatten(chain, params).detach().clone()[0]
    if mask_flat is not None:
        base.mul_(mask_flat[0].to(base.dtype))
    free = torch.ones_like(base, dtype=torch.bool) if grad_mask is None else grad_mask[0] != 0
    index = torch.nonzero(free)[:, 0]
    x, y = data.x, data.y

    def residuals(full: torch.Tensor) -> torch.Tensor:
        return (forward(chain, unflatten(chain, full[None]), x)[0] - y).reshape(-1)

    # the Jacobian over every parameter, the free columns taken (cheaper than a scatter in it)
    jacobian = torch.func.jacfwd if len(base) <= y.numel() else torch.func.jacrev

    def full_of(theta: np.ndarray) -> torch.Tensor:
        return base.index_put((index,), torch.from_numpy(np.array(theta, copy=True)).to(base))

    def r_np(theta):
        with torch.no_grad():
            return residuals(full_of(theta)).double().cpu().numpy()

    def j_np(theta):
        return jacobian(residuals)(full_of(theta))[:, index].detach().double().cpu().numpy()

    tol = max(h.tolerance, float(np.finfo(np.float64).eps))
    solution = least_squares(
        r_np,
        base[index].double().cpu().numpy(),
        jac=j_np,
        method="lm" if y.numel() >= len(index) else "trf",
        ftol=tol,
        xtol=tol,
        gtol=0.0 if y.numel() < len(index) else tol,
        max_nfev=max(1, h.max_epochs),
    )
    flat = full_of(solution.x)[None]
    final = {k: v.detach().clone() for k, v in unflatten(chain, flat).items()}
    train = per_network_mse(chain, final, data.x, data.y)
    status = "converged" if solution.status > 0 else "max_epochs"
    if not bool(torch.isfinite(train).all()):
        status = "diverged"
    rows = [_log_rows(chain, flat, data, solution.nfev, train, torch.tensor([0.0]))]
    return FitResult(
        final,
        train,
        per_network_mse(chain, final, data.x_test, data.y_test),
        [status],
        int(solution.nfev),
        _history(rows),
    )


def _fit_lbfgs_stack(
    chain: Chain,
    params: dict,
    data: ProbeData,
    h: FitHparams,
    mask_flat,
    grad_mask,
    history: int = 20,
    c1: float = 1e-4,
    backtracks: int = 30,
) -> FitResult:
    """Full-batch L-BFGS of N stacked networks at once, each on its own: per network the
    two-loop recursion over its last ``history`` curvature pairs ``(s, y)`` (a pair with ``s.y
    <= 0`` is skipped), the initial scaling ``s.y / y.y``, and a backtracking step from ``t = 1``
    (halved until Armijo's ``f(x + t d) <= f(x) + c1 t g.d``); each trial evaluates, in one
    pass, only the networks still searching (so a network's path does not depend on the
    others). A network stops when its loss changes by less than ``tolerance`` (relative),
    falls below ``floor`` x mean(y^2) or no step decreases it (``converged``), when its loss is
    above ``behind`` x the best network's (``behind``), or after ``max_epochs`` iterations."""
    flat = flatten(chain, params).detach().clone()
    if mask_flat is not None:
        flat.mul_(mask_flat.to(flat.dtype))
    n = flat.shape[0]

    loss_grad = StackedMSE(chain)

    def evaluate(x, rows):
        """Loss [k] and gradient [k, P] of ``x [k, P]``, networks ``rows`` [k] of the stack."""
        per, g = loss_grad(x.contiguous(), data.x, data.y)
        if grad_mask is not None:
            g.mul_(grad_mask[rows])
        return per, g

    def dot(a, b):
        return (a * b).sum(1)

    f, g = evaluate(flat, torch.arange(n, device=flat.device))
    floor = h.floor * float((data.y**2).mean())
    active = torch.isfinite(f)
    status = torch.where(active, STATUS.index("max_epochs"), STATUS.index("diverged"))
    pairs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # s, y, 1/s.y (0: skip)
    gamma = torch.ones(n, dtype=flat.dtype, device=flat.device)
    rows, done = [], 0
    for done in range(1, h.max_epochs + 1):
        q = -g
        alphas = []
        for s_k, y_k, r_k in reversed(pairs):
            a = r_k * dot(s_k, q)
            q = q - a[:, None] * y_k
            alphas.append(a)
        q = q * gamma[:, None]
        for (s_k, y_k, r_k), a in zip(pairs, reversed(alphas), strict=True):
            q = q + s_k * (a - r_k * dot(y_k, q))[:, None]
        gd = dot(g, q)
        uphill = gd >= 0
        q = torch.where(uphill[:, None], -g, q)
        gd = torch.where(uphill, -dot(g, g), gd)
        q = torch.where(active[:, None], q, torch.zeros_like(q))
        t = torch.ones(n, dtype=flat.dtype, device=flat.device)
        if not pairs:
            t = torch.clamp(1.0 / g.abs().sum(1).clamp_min(1e-300), max=1.0)
        new_x, new_f, new_g = flat.clone(), f.clone(), g.clone()
        pending = active.clone()
        for _ in range(backtracks):
            trying = torch.nonzero(pending)[:, 0]
            trial = flat[trying] + t[trying, None] * q[trying]
            ft, gt = evaluate(trial, trying)
            ok = torch.isfinite(ft) & (ft <= f[trying] + c1 * t[trying] * gd[trying])
            took = trying[ok]
            new_x[took], new_f[took], new_g[took] = trial[ok], ft[ok], gt[ok]
            pending[took] = False
            if not bool(pending.any()):
                break
            t = torch.where(pending, t / 2, t)
        stalled = pending  # no step decreased the loss: as far as it goes
        s_k, y_k = new_x - flat, new_g - g
        sy = dot(s_k, y_k)
        good = sy > 1e-10 * dot(y_k, y_k).clamp_min(torch.finfo(flat.dtype).tiny)
        pairs.append((s_k, y_k, torch.where(good, 1.0 / sy.clamp_min(1e-300), 0.0)))
        gamma = torch.where(good, sy / dot(y_k, y_k).clamp_min(1e-300), gamma)
        if len(pairs) > history:
            pairs.pop(0)
        small = (f - new_f).abs() <= h.tolerance * new_f.abs().clamp_min(1e-300)
        stop = active & (stalled | small | (new_f <= floor))
        status[stop] = STATUS.index("converged")
        finite = torch.isfinite(new_f)
        if h.behind is not None and bool(finite.any()):
            lagging = active & ~stop & (new_f > h.behind * new_f[finite].min())
            status[lagging] = STATUS.index("behind")
            stop |= lagging
        active &= ~stop
        flat, f, g = new_x, new_f, new_g
        if done % h.log_every == 0:
            rows.append(_log_rows(chain, flat, data, done, f, torch.full_like(f, h.lr)))
        if not bool(active.any()):
            break
    if not rows or rows[-1][0, 0] != done:  # the last iteration, unless logged in the loop
        rows.append(_log_rows(chain, flat, data, done, f, torch.full_like(f, h.lr)))
    final = _snapshot(chain, flat)
    return FitResult(
        final,
        per_network_mse(chain, final, data.x, data.y),
        per_network_mse(chain, final, data.x_test, data.y_test),
        [STATUS[i] for i in status.tolist()],
        done,
        _history(rows),
    )


def student_chain(teacher: Chain, rho: float) -> Chain:
    """The students' architecture: every hidden width x ``rho`` (rounded up)."""
    return teacher.with_widths(math.ceil(rho * w) for w in teacher.widths)


def train_students(
    teacher: Chain, data: ProbeData, h: ExpandHparams, resume=None
) -> tuple[Chain, FitResult]:
    """Initialise ``h.students`` students (``mlp`` init, student n from ``(seed, n)``) of width
    ``rho`` x the teacher's and fit them in ``h.dtype`` (``h.fit``), then in
    ``h.polish_dtype`` (``h.polish``, if any); ``(student chain, result)``: the result's
    parameters in the last fit's dtype."""
    dtype = devices.dtype(h.dtype, "expand.dtype")
    chain = student_chain(teacher, h.rho)
    params = init_stack(chain, h.students, h.seed, dtype)
    params = {k: v.to(data.x.device) for k, v in params.items()}
    fit_data = data.to(data.x.device, dtype)
    result = fit(chain, params, fit_data, h.fit, h.seed, resume, tag="students")
    if h.polish is not None:  # from the probe data as given, not their rounding to h.dtype
        result = polish_students(chain, result, data, h)
    return chain, result


def polish_students(chain: Chain, result: FitResult, data: ProbeData, h: ExpandHparams):
    """``h.polish`` of the fitted students ``result`` in ``h.polish_dtype``, from where the fit
    ended: one result, the polish's epochs counted after the fit's."""
    dtype = devices.dtype(h.polish_dtype, "expand.polish_dtype")
    params = {k: v.to(dtype) for k, v in result.params.items()}
    data = data.to(data.x.device, dtype)
    polished = fit(chain, params, data, h.polish, h.seed, tag="students-polish")
    history = polished.history.assign(epoch=polished.history.epoch + result.epochs)
    return FitResult(
        polished.params,
        polished.train_loss,
        polished.test_loss,
        polished.status,
        result.epochs + polished.epochs,
        pd.concat([result.history, history], ignore_index=True),
    )
