"""Training one mask on one subtask, the network's weights frozen.

Objective per step, on a batch of ``B`` items split into ``K`` blocks (one mask sample each):
``CE_mean + (alpha / B) * sum of all trained logits`` (the paper's regulariser: raw logits, not
``sigmoid(l)``, so it is unbounded below and under Adam its strength is set mostly by the learning
rate and the step count: report all three). Adam on the logits only (a fresh optimiser per mask),
optional linear warm-up, gradient norm clipped to ``clip``. The network is in eval mode
(dropout off, BatchNorm on its running statistics) and its weights get no gradient. Under Adam a
weight the task never needs sees only the regulariser and its logit falls by about ``lr`` per
step: from ``init = 2`` it is dropped after ``2 / lr`` steps (200 at ``lr = 1e-2``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from pipeline import seeding
from pipeline.masks.batched import model_weights, stacked_outputs
from pipeline.masks.sampling import init_logits, sample_masked_all
from pipeline.masks.views import View
from pipeline.train.engine import Engine, batches_from
from pipeline.train.optim import Adam, multi_head_ce


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


@dataclass(frozen=True)
class MaskHparams:
    steps: int = _h("mask training steps per subtask (paper: 20,000)", default=20000)
    lr: float = _h("Adam learning rate of the logits (paper: 1e-2; CIFAR 1e-3)", default=1e-2)
    alpha: float = _h(
        "regulariser weight on the sum of logits, divided by the batch size", default=1e-4
    )
    init: float = _h("initial logit (2.0: keep probability 0.88)", default=2.0)
    samples: int = _h("mask samples per step, each on its share of the batch (K)", default=4)
    batch_size: int = _h("items per step (a multiple of samples)", default=128)
    clip: float = _h("gradient norm clip over the logits (0: none)", default=1.0)
    warmup: int = _h("linear learning-rate warm-up steps", default=0)
    biases: bool = _h("mask biases too (the paper's arithmetic profiles do not)", default=False)
    log_every: int = _h("steps between history rows", default=50)

    def __post_init__(self):
        if self.samples < 1 or self.batch_size % self.samples:
            raise ValueError(
                f"masks.batch_size {self.batch_size} must be a positive multiple of "
                f"masks.samples {self.samples}"
            )
        if self.steps < 1:
            raise ValueError(f"masks.steps must be positive, got {self.steps}")


@dataclass
class MaskResult:
    logits: dict[str, torch.Tensor]  # trained logits (detached)
    fixed: dict[str, torch.Tensor]  # masks held fixed during training (bool)
    history: list[dict]  # step, loss, task_loss, kept (fraction of logits > 0)


class MaskTask:
    """Mask training as a task on the engine (:mod:`pipeline.train.engine`): one "epoch" of
    ``h.steps`` updates over the endless batch stream of a view.

    Per update: K sampled masks on their shares of the batch in one batched pass, task
    cross-entropy plus ``alpha / B`` times the sum of the logits (``forward_backward`` returns
    ``(task loss, regulariser)``), optional linear warm-up of the learning rate; ``update``
    clips the gradient norm of ``clipped`` and steps ``opt``. ``check``: the task loss must be
    finite every ``h.log_every`` steps and at the last. No resume state (run it with
    ``store=None``): a mask's training is short, its job reruns it whole.
    """

    def __init__(
        self, model, weights, logits, opt, clipped, h: MaskHparams, noise, view, seed, where: str
    ):
        self.model, self.weights, self.logits, self.opt = model, weights, logits, opt
        self.clipped, self.h, self.noise, self.where = clipped, h, noise, where
        self.stream = view.batches(h.batch_size, seed)
        self.steps_per_epoch = h.steps
        self.step = 0  # updates begun (the warm-up's step of the current update)

    def batches(self, epoch: int, start: int):
        return batches_from(self.stream, self.h.steps - start)

    def forward_backward(self, batch):
        h, x, y = self.h, *batch
        self.step += 1
        if h.warmup:
            for group in self.opt.param_groups:
                group["lr"] = h.lr * min(1.0, self.step / h.warmup)
        stacked = sample_masked_all(self.weights, self.logits, h.samples, self.noise)
        task = multi_head_ce(stacked_outputs(self.model, self.weights, stacked, x), y)
        reg = sum(l.sum() for l in self.logits.values()) * (h.alpha / h.batch_size)
        self.opt.zero_grad(set_to_none=True)
        (task + reg).backward()
        return task, reg

    def update(self) -> None:
        if self.h.clip:
            torch.nn.utils.clip_grad_norm_(self.clipped, self.h.clip)
        self.opt.step()

    def check(self, out, epoch_end: bool) -> str | None:
        if self.step % self.h.log_every == 0 or epoch_end:
            value = float(out[0].detach())
            if not math.isfinite(value):
                return f"{self.where}: the loss became {value} by step {self.step}; lower masks.lr"
        return None


class _History:
    """Engine callback: a row ``(step, loss, task_loss, kept)`` every ``log_every`` steps and
    at the last (``kept``: the fraction of logits > 0)."""

    def __init__(self, logits: dict, log_every: int):
        self.logits, self.log_every, self.rows = logits, log_every, []

    def after_update(self, run, out) -> None:
        step = run.step + 1  # the engine counts this update after after_update
        if step % self.log_every and step != run.total_steps:
            return
        task, reg = out
        with torch.no_grad():
            kept = sum(int((l > 0).sum()) for l in self.logits.values())
            total = sum(l.numel() for l in self.logits.values())
        self.rows.append(
            {
                "step": step,
                "loss": float((task + reg).detach()),
                "task_loss": float(task.detach()),
                "kept": kept / max(total, 1),
            }
        )


def train_mask(
    model: torch.nn.Module,
    params: list[str],
    view: View,
    h: MaskHparams,
    seed: int = 1234,
    fixed: dict[str, torch.Tensor] | None = None,
    init: dict[str, torch.Tensor] | None = None,
) -> MaskResult:
    """Learn a mask over ``params`` for the items of ``view`` (a :class:`MaskTask` on the
    engine; a non-finite loss raises :class:`pipeline.train.engine.TrainingDiverged`).

    ``fixed``: masks applied as given and not trained (e.g. the output layer copied from the
    reference mask in class removal); ``init``: starting logits (default: all ``h.init``).
    ``seed`` fixes the data order and the mask noise.
    """
    model.eval()
    weights = model_weights(model)
    fixed = {n: m.to(torch.bool) for n, m in (fixed or {}).items()}
    trained = [p for p in params if p not in fixed]
    unknown = [p for p in params if p not in weights]
    if unknown:
        raise KeyError(f"parameters {unknown} are not in the model")
    logits = init_logits(weights, trained, h.init)
    if init:
        with torch.no_grad():
            for n in trained:
                logits[n].copy_(init[n])
    base = {n: (w * fixed[n].to(w.dtype) if n in fixed else w) for n, w in weights.items()}
    opt = Adam(list(logits.values()), lr=h.lr)
    noise = seeding.generator(seed, "mask-noise", device=next(iter(weights.values())).device)
    where = f"mask training on {view.name!r}"
    task = MaskTask(model, base, logits, opt, list(logits.values()), h, noise, view, seed, where)
    history = _History(logits, h.log_every)
    Engine(task, 1, callbacks=(history,), where=where).run()
    return MaskResult({n: l.detach() for n, l in logits.items()}, fixed, history.rows)
