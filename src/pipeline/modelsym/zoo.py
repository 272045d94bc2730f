"""Train a zoo: K independently seeded same-shape models as one vectorised program.

The K models' parameters are stacked along a new leading axis
(``torch.func.stack_module_state``) and one ``vmap(functional_call)`` runs all of them on their
own minibatches: inputs ``[K, B, ...]``, logits ``[K, B, classes]``. The loss is the *sum* of the
members' mean losses, so each member's gradient is exactly its own, and SGD/Adam (elementwise
optimizers, coupled weight decay) update each slice as K separate optimizers would: member k
follows the run ``train_run`` would do with seed k (same init, same per-epoch batch order
``(seed, epoch)``, same augmentation), up to float re-association.

Checkpoint selection: after every epoch each member is evaluated on the validation split (held
out of the training data) and on the test split; its stored weights are those of the epoch with
the best validation accuracy (the first of equals). The test numbers are only reported.

Limits (clear errors): no BatchNorm (running statistics are per-member mutable state), no
active dropout, no plateau schedule (the learning rate is shared). Those models train as
ordinary runs and become members through :func:`pipeline.modelsym.members.select_checkpoint`.

The training is a :class:`ZooTask` on the one engine (:mod:`pipeline.train.engine`): the step is
the vmapped loss of all members; the epoch end evaluates, selects and steps the schedule.

Outputs in ``out_dir``: ``seed~{s}.pt`` (member files), ``history.parquet`` (seed, epoch, split,
loss, accuracy, lr), ``summary.json``; resume state in ``out_dir/.resume/`` (the engine's format,
written at every epoch end, only the newest kept, never a declared output), so a killed job goes
on from its last finished epoch. A job asked to stop (SIGTERM, see :mod:`pipeline.train.stop`)
writes it at the batch it reached and exits; the resumed job ends bit-identical (on the CPU) to an
uninterrupted one.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, stack_module_state, vmap

from pipeline import io, seeding
from pipeline.config import DatasetHparams, TrainHparams, run_fingerprint
from pipeline.data.tensors import TensorData, augment
from pipeline.modelsym.members import save_member
from pipeline.train.engine import Engine, ResumeStore
from pipeline.train.optim import Schedule, loss_fn, make_optimizer, predictions
from pipeline.train.setup import placed_data, run_model

SPLITS = ("train", "val", "test")


def member_path(out_dir, seed: int) -> Path:
    return Path(out_dir) / f"seed~{seed}.pt"


def check_vectorisable(model: torch.nn.Module, name: str) -> None:
    """Raise ``ValueError`` if ``model`` cannot train inside ``vmap`` (BatchNorm, dropout)."""
    for path, mod in model.named_modules():
        if isinstance(mod, torch.nn.modules.batchnorm._NormBase):
            raise ValueError(
                f"model {name!r} has BatchNorm ({path}): its running statistics are mutable "
                "per-model state, so it cannot train in a vectorised zoo; train it as separate "
                "runs and select checkpoints with pipeline.modelsym.members.select_checkpoint"
            )
        if isinstance(mod, torch.nn.modules.dropout._DropoutNd) and mod.p > 0:
            raise ValueError(
                f"model {name!r} has active dropout ({path}); set dropout: 0 to "
                "train it in a vectorised zoo"
            )


class Zoo:
    """K same-shape models as stacked parameters; ``forward(params, x)`` runs all of them.

    ``x``: ``[K, B, ...]`` (each member its own batch) or ``[B, ...]`` (shared); returns
    ``[K, B, outputs]``.
    """

    def __init__(self, models: list[torch.nn.Module], input_shape: tuple[int, ...]):
        self.input_shape = tuple(input_shape)
        self.skeleton = copy.deepcopy(models[0]).to("meta")
        params, buffers = stack_module_state(models)
        self.params = {k: v.detach().clone().requires_grad_(True) for k, v in params.items()}
        self.buffers = buffers
        self.size = len(models)

        def one(p, b, x):
            return functional_call(self.skeleton, (p, b), (x,))

        self._own = vmap(one)
        self._shared = vmap(one, in_dims=(0, 0, None))

    def forward(self, params: dict, x: torch.Tensor) -> torch.Tensor:
        if x.ndim == len(self.input_shape) + 2:
            return self._own(params, self.buffers, x)
        return self._shared(params, self.buffers, x)

    def state(self, k: int, params: dict | None = None) -> dict:
        """Member ``k``'s state dict (from ``params``, default the live parameters)."""
        params = self.params if params is None else params
        out = {n: p[k].detach().clone() for n, p in params.items()}
        out.update({n: b[k].clone() for n, b in self.buffers.items()})
        return out


@torch.no_grad()
def evaluate_zoo(zoo: Zoo, params: dict, split, loss, batch_size: int):
    """Per-member mean loss and accuracy over a split (all members see the same examples)."""
    total = torch.zeros(zoo.size, dtype=torch.float64)
    correct = torch.zeros(zoo.size, dtype=torch.float64)
    n = 0
    for x, y in split.eval_batches(batch_size):
        out = zoo.forward(params, x)
        total += vmap(loss, in_dims=(0, None))(out, y).double().cpu() * len(y)
        correct += vmap(predictions, in_dims=(0, None))(out, y).double().sum(1).cpu()
        n += len(y)
    return (total / max(n, 1)).numpy(), (correct / max(n, 1)).numpy()


def _batches(train: TensorData, seeds, batch_size, drop_last, epoch, augment_images, start=0):
    """Member k's minibatches of ``epoch`` exactly as ``TensorData.train_batches`` cuts them,
    from batch ``start`` on."""
    orders = torch.stack(
        [torch.randperm(len(train), generator=seeding.generator(s, "order", epoch)) for s in seeds]
    ).to(train.x.device)
    for b in range(start, train.num_batches(batch_size, drop_last)):
        idx = orders[:, b * batch_size : (b + 1) * batch_size]
        x = train.normalise(train.x[idx.reshape(-1)]).reshape(*idx.shape, *train.x.shape[1:])
        if augment_images:
            x = torch.stack(
                [
                    augment(x[k], seeding.generator(s, "augment", epoch, b))
                    for k, s in enumerate(seeds)
                ]
            )
        yield x, train.y[idx]


class ZooTask:
    """A vectorised zoo as an engine task (:class:`pipeline.train.engine.Task`).

    Step: the sum over members of their mean batch losses (``vmap`` over the stacked
    parameters), one optimizer step for all; per-member training loss/accuracy summed over the
    epoch's batches (``[K]`` float64). Epoch end: the history rows (the epoch's mean training
    numbers, then every evaluation split per member), the validation-best parameters per member
    (``best``, first of equals), the schedule's next learning rate. ``check``: at an epoch end,
    the seeds whose summed training loss is not finite.
    """

    def __init__(self, zoo: Zoo, data, h: TrainHparams, seeds: list[int], where: str):
        self.zoo, self.data, self.h, self.seeds, self.where = zoo, data, h, seeds, where
        self.optimizer = make_optimizer(zoo.params, h)
        self.sched = Schedule(h)
        self.loss = loss_fn(h.loss)
        self.steps_per_epoch = data.train.num_batches(h.batch_size, h.drop_last)
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"train.batch_size {h.batch_size} exceeds the {len(data.train)} "
                "training examples (with drop_last)"
            )
        K = zoo.size
        self.device = data.train.x.device
        self.best = {k: v.detach().clone() for k, v in zoo.params.items()}
        self.best_acc = np.full(K, -np.inf)
        self.best_epoch = np.zeros(K, dtype=np.int64)
        self.best_metrics = [dict() for _ in range(K)]
        self.rows: list[tuple] = []  # (member, epoch, split, loss, accuracy, lr)
        # per-member sums over the epoch's batches
        self.train_loss = torch.zeros(K, dtype=torch.float64, device=self.device)
        self.train_correct = torch.zeros(K, dtype=torch.float64, device=self.device)
        self.epoch, self.seconds, self._started = 0, 0.0, None
        Schedule.apply(self.optimizer, self.sched.lr)

    def batches(self, epoch: int, start: int):
        self.epoch, self._started = epoch, time.perf_counter()
        if start == 0:
            self.train_loss.zero_()
            self.train_correct.zero_()
        h = self.h
        return _batches(
            self.data.train, self.seeds, h.batch_size, h.drop_last, epoch, h.augment, start
        )

    def forward_backward(self, batch) -> torch.Tensor:
        x, y = batch
        self.optimizer.zero_grad(set_to_none=True)
        out = self.zoo.forward(self.zoo.params, x)
        losses = vmap(self.loss)(out, y)
        losses.sum().backward()
        with torch.no_grad():
            self.train_loss += losses.detach().double()
            self.train_correct += vmap(predictions)(out.detach(), y).double().mean(1)
        return losses.detach()

    def update(self) -> None:
        self.optimizer.step()

    def check(self, out, epoch_end: bool) -> str | None:
        if not epoch_end or torch.isfinite(self.train_loss).all():
            return None
        finite = torch.isfinite(self.train_loss).tolist()
        bad = [s for s, ok in zip(self.seeds, finite, strict=True) if not ok]
        return (
            f"{self.where}: training loss became NaN/inf in epoch {self.epoch} "
            f"for seeds {bad}; lower train.lr"
        )

    def end_epoch(self, epoch: int) -> dict:
        zoo, K, per_epoch, lr = self.zoo, self.zoo.size, self.steps_per_epoch, self.sched.lr
        for k in range(K):
            self.rows.append(
                (
                    k,
                    epoch + 1,
                    0,
                    float(self.train_loss[k]) / per_epoch,
                    float(self.train_correct[k]) / per_epoch,
                    lr,
                )
            )
        metrics = {}
        for split, part in self.data.eval_splits().items():
            lo, ac = evaluate_zoo(zoo, zoo.params, part, self.loss, self.h.eval_batch_size)
            metrics[split] = (lo, ac)
            self.rows += [(k, epoch + 1, SPLITS.index(split), lo[k], ac[k], lr) for k in range(K)]
        val_acc = metrics["val"][1]
        improved = val_acc > self.best_acc
        with torch.no_grad():
            mask = torch.as_tensor(improved, device=self.device)
            for n, p in zoo.params.items():
                shaped = mask.reshape(-1, *[1] * (p.ndim - 1))
                self.best[n] = torch.where(shaped, p.detach(), self.best[n])
        for k in np.flatnonzero(improved):
            self.best_acc[k], self.best_epoch[k] = val_acc[k], epoch + 1
            self.best_metrics[k] = {
                f"{s}_{m}": float(metrics[s][i][k])
                for s in metrics
                for i, m in enumerate(("loss", "accuracy"))
            }
        Schedule.apply(self.optimizer, self.sched.end_epoch(epoch, {}))
        self.seconds += time.perf_counter() - self._started
        self._started = None
        return {
            f"{s}_{m}": [float(v) for v in metrics[s][i]]
            for s in metrics
            for i, m in enumerate(("loss", "accuracy"))
        }

    def state_dict(self) -> dict:
        running = time.perf_counter() - self._started if self._started is not None else 0.0
        return {
            "seconds": self.seconds + running,
            "params": {k: v.detach() for k, v in self.zoo.params.items()},
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.sched.state_dict(),
            "best": self.best,
            "best_acc": torch.as_tensor(self.best_acc),
            "best_epoch": torch.as_tensor(self.best_epoch),
            "best_metrics": self.best_metrics,
            "rows": torch.tensor(self.rows, dtype=torch.float64),
            "train_loss": self.train_loss,
            "train_correct": self.train_correct,
        }

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for k, v in state["params"].items():
                self.zoo.params[k].copy_(v)
        self.optimizer.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["schedule"])
        self.best = {k: v.to(self.device, copy=True) for k, v in state["best"].items()}
        self.best_acc = state["best_acc"].numpy()
        self.best_epoch = state["best_epoch"].numpy()
        self.best_metrics = state["best_metrics"]
        self.rows = [tuple(r) for r in state["rows"].tolist()]
        self.seconds = state["seconds"]
        self.train_loss.copy_(state["train_loss"])
        self.train_correct.copy_(state["train_correct"])
        Schedule.apply(self.optimizer, self.sched.lr)


def train_zoo(
    out_dir,
    hparams: dict,
    seeds: list[int],
    device: str = "cpu",
    data_dir: str = "data",
    threads: int = 1,
    callbacks: tuple = (),
) -> dict:
    """Train one member per seed of the run ``hparams`` (its ``seed`` is ignored) into ``out_dir``.

    ``callbacks``: engine callbacks (:mod:`pipeline.train.engine`), e.g. ``on_epoch_end(run)``,
    called after an epoch's resume state is written (the zoo: ``run.task.zoo``). Returns the
    summary (also written to ``summary.json``).
    """
    out_dir = Path(out_dir)
    seeds = [int(s) for s in seeds]
    if not seeds or len(set(seeds)) != len(seeds):
        raise ValueError(f"zoo seeds must be distinct and non-empty; got {seeds}")
    torch.set_num_threads(threads)
    h = TrainHparams(**hparams["train"])
    d = DatasetHparams(**hparams["dataset"])
    if h.schedule == "plateau":
        raise ValueError(
            "train.schedule: plateau is per-model; a vectorised zoo needs constant, "
            "step or multistep"
        )
    dev, dtype, data = placed_data(hparams, device, data_dir)
    if data.val is None or not len(data.val):
        raise ValueError(
            "dataset.val_fraction must be > 0: zoo checkpoints are selected on the "
            "validation split, never on the test set"
        )
    if not isinstance(data.train, TensorData):
        raise ValueError(
            f"dataset {d.name!r} is read from image folders; a vectorised zoo needs "
            "a dataset resident as tensors"
        )
    models = [run_model(hparams, data, s, dtype, dev) for s in seeds]
    check_vectorisable(models[0], hparams["model"]["name"])
    task = ZooTask(Zoo(models, data.input_shape), data, h, seeds, str(out_dir))
    per_epoch = task.steps_per_epoch
    Engine(
        task,
        h.epochs,
        store=ResumeStore(out_dir / ".resume", keep_last=1),
        save_steps=range(per_epoch, per_epoch * h.epochs + 1, per_epoch),
        callbacks=callbacks,
        fingerprint=run_fingerprint({**hparams, "seed": None, "zoo_seeds": seeds}),
        on_nan="error",
        where=str(out_dir),
    ).run()
    return _finish(
        out_dir,
        task.zoo,
        task.best,
        hparams,
        seeds,
        data,
        task.best_epoch,
        task.best_metrics,
        task.rows,
        per_epoch,
        h,
        task.seconds,
    )


def _finish(
    out_dir, zoo, best, hparams, seeds, data, best_epoch, best_metrics, rows, per_epoch, h, seconds
) -> dict:
    info = {
        "input_shape": list(data.input_shape),
        "num_classes": data.num_outputs,
        "param_names": list(zoo.params),
    }
    members = {}
    for k, s in enumerate(seeds):
        e = int(best_epoch[k])
        save_member(
            member_path(out_dir, s),
            zoo.state(k, best),
            {**hparams, "seed": s},
            info,
            e,
            e * per_epoch,
            best_metrics[k],
        )
        members[str(s)] = {"epoch": e, **best_metrics[k]}
    arr = np.array(rows, dtype=float).reshape(-1, 6)
    history = {
        "seed": np.asarray(seeds)[arr[:, 0].astype(int)],
        "epoch": arr[:, 1].astype(np.int64),
        "split": arr[:, 2].astype(np.int64),
        "loss": arr[:, 3],
        "accuracy": arr[:, 4],
        "lr": arr[:, 5],
    }
    # pandas reads ``split`` back as a categorical of SPLITS (writing it takes no pandas import)
    io.write_columns(Path(out_dir) / "history.parquet", history, categories={"split": SPLITS})
    steps = per_epoch * h.epochs
    summary = {
        "seeds": seeds,
        "members": members,
        "epochs": h.epochs,
        "steps": steps,
        "seconds": seconds,
        "examples_per_second": len(seeds) * steps * h.batch_size / seconds if seconds else None,
    }
    io.write_json(Path(out_dir) / "summary.json", summary)
    return summary
