"""The training loop of a run: one model from its hyperparameters to its run directory
(:mod:`pipeline.layout`), resumable after a kill.

The loop is the engine's (:mod:`pipeline.train.engine`) over a :class:`RunTask`. Resume states
are ``checkpoints/step*.pt``; with every state, the history (and trace) rows since the last one go
to ``segments/``. A re-run finds the newest valid checkpoint, drops segments after it, and goes
on. A job asked to stop (SIGTERM, see :mod:`pipeline.train.stop`) writes a *resume-only*
checkpoint at the step it reached, outside the manifest, and exits; the resumed run deletes it at
its next scheduled checkpoint, so the outputs equal an uninterrupted run's. Each epoch's batch
order derives from ``(seed, epoch)`` and dropout's RNG state is checkpointed, so with a fixed
thread count a resumed CPU run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import time
from pathlib import Path

import numpy as np
import torch

from pipeline import devices, io, seeding
from pipeline.config import CheckpointHparams, TrainHparams, run_fingerprint
from pipeline.layout import RunPaths
from pipeline.models import neuron_structure
from pipeline.train.engine import Engine, ResumeStore, drop_after
from pipeline.train.engine import TrainingDiverged as TrainingDiverged  # re-exported
from pipeline.train.optim import Schedule, evaluate, loss_fn, make_optimizer, predictions
from pipeline.train.schedule import checkpoint_steps
from pipeline.train.setup import placed_data, run_model
from pipeline.train.trace import MechanicsTrace

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")


class _Rows:
    """History rows since the last segment: step, epoch, split, loss, accuracy, lr.

    Rows keep the order they were recorded in, so where segments end never changes the history.
    """

    def __init__(self):
        self.train: list = []  # (step, epoch, loss tensor, correct-fraction tensor, lr)
        self.evals: list = []  # (number of train rows before it, eval row)

    def add_eval(self, row: tuple) -> None:
        self.evals.append((len(self.train), row))

    def segment(self) -> dict[str, np.ndarray]:
        train = [(s, e, 0, float(lo), float(ac), lr) for s, e, lo, ac, lr in self.train]
        rows, done = [], 0
        for position, row in self.evals:
            rows += train[done:position]
            rows.append(row)
            done = position
        rows += train[done:]
        self.train, self.evals = [], []
        arr = np.array(rows, dtype=float).reshape(-1, 6)
        return {
            "h_step": arr[:, 0].astype(np.int64),
            "h_epoch": arr[:, 1].astype(np.int64),
            "h_split": arr[:, 2].astype(np.int64),
            "h_loss": arr[:, 3],
            "h_accuracy": arr[:, 4],
            "h_lr": arr[:, 5],
        }


class RunStep:
    """The step of a run's model (an engine task, :mod:`pipeline.train.engine`): minibatches of
    the run's train split in the order ``(seed, epoch)`` gives, its loss, one optimizer update;
    the learning-rate schedule at epoch ends. A lottery level trains with this step alone."""

    def __init__(self, model, optimizer, sched, loss, data, h, seed, dev):
        self.model, self.optimizer, self.sched, self.loss = model, optimizer, sched, loss
        self.data, self.h, self.seed, self.dev = data, h, seed, dev
        self.steps_per_epoch = data.train.num_batches(h.batch_size, h.drop_last)
        self.epoch = 0
        Schedule.apply(optimizer, sched.lr)

    @property
    def lr(self) -> float:
        return self.sched.lr

    def batches(self, epoch: int, start: int):
        self.epoch = epoch
        h = self.h
        return self.data.train.train_batches(
            h.batch_size, h.drop_last, self.seed, epoch, start, h.augment
        )

    def forward_backward(self, batch):
        x, y = batch
        self.optimizer.zero_grad(set_to_none=True)
        out = self.model(x)
        value = self.loss(out, y)
        value.backward()
        return out, y, value

    def update(self) -> None:
        self.optimizer.step()
        if devices.is_xla(self.dev):
            devices.sync(self.dev)

    def end_epoch(self, epoch: int) -> dict:
        Schedule.apply(self.optimizer, self.sched.end_epoch(epoch, {}))
        return {}


class RunTask(RunStep):
    """An ordinary run's task: :class:`RunStep` plus its record - ``rows`` collects the history
    (train rows per step, eval rows per epoch end), the loss is checked every step, and the
    state (model, optimizer, schedule) goes into every checkpoint."""

    def __init__(self, model, optimizer, sched, loss, data, h, seed, dev, info, where=""):
        super().__init__(model, optimizer, sched, loss, data, h, seed, dev)
        self.where, self.info = where, info
        self.dtype = devices.dtype(h.dtype, "train.dtype")
        self.rows = _Rows()
        self.step = 0
        # on the CPU reading the loss costs nothing; on accelerators it syncs: check in batches
        self.host = dev.type == "cpu"
        self.check_every = 1 if self.host else 25

    def measure(self, step: int, epoch: int) -> dict:
        """Loss and accuracy on every evaluation split (and their history rows)."""
        metrics = {}
        for split, part in self.data.eval_splits().items():
            lo, ac = evaluate(self.model, part, self.loss, self.h.eval_batch_size)
            metrics[f"{split}_loss"], metrics[f"{split}_accuracy"] = lo, ac
            self.rows.add_eval((step, epoch, SPLITS.index(split), lo, ac, self.sched.lr))
        return metrics

    def begin(self) -> dict:
        return self.measure(0, 0)

    def record(self, out) -> None:
        """The step's history row (after the update: its loss, accuracy and lr)."""
        out, y, value = out
        loss_value = value.item() if self.host else value.detach()
        accuracy = predictions(out.detach(), y).to(self.dtype).mean()
        self.rows.train.append((self.step, self.epoch, loss_value, accuracy, self.sched.lr))
        self.step += 1

    def check(self, out, epoch_end: bool) -> str | None:
        self.record(out)
        last = self.rows.train[-1][2]
        if self.host:
            finite = math.isfinite(last)
        elif self.step % self.check_every == 0 or epoch_end:
            recent = torch.stack([r[2] for r in self.rows.train[-self.check_every :]])
            finite = bool(torch.isfinite(recent).all())
        else:
            finite = True
        if finite:
            return None
        return (
            f"{self.where}: training loss became NaN/inf by step {self.step} "
            f"(epoch {self.epoch}); lower train.lr, or set train.on_nan: record to end such "
            "runs as diverged and go on"
        )

    def end_epoch(self, epoch: int) -> dict:
        metrics = self.measure(self.step, epoch + 1)
        Schedule.apply(self.optimizer, self.sched.end_epoch(epoch, metrics))
        return metrics

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.sched.state_dict(),
            "info": self.info,
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["schedule"])
        Schedule.apply(self.optimizer, self.sched.lr)
        self.step, self.epoch = state["step"], state["epoch"]


class _Segments:
    """Engine callback: with every saved state, the history (and trace) rows since the last one
    go to ``segments/{step}.npz`` (a scheduled save's also carries its manifest entry)."""

    def __init__(self, paths: RunPaths, task: RunTask, trace):
        self.paths, self.task, self.trace = paths, task, trace

    def on_start(self, run) -> None:
        self.drop_after(-1)

    def on_resume(self, run) -> None:
        self.drop_after(run.step)

    def drop_after(self, step: int) -> None:
        drop_after(self.paths.segments, step, "*.npz")

    def on_save(self, run, metrics: dict, resume_only: bool) -> None:
        entry = None
        if not resume_only:
            entry = {
                "step": run.step,
                "epoch": run.epoch,
                "file": str(self.paths.checkpoint(run.step).relative_to(self.paths.root)),
                "metrics": metrics,
            }
        self.write(run.step, entry)

    def write(self, step: int, entry: dict | None = None) -> None:
        seg = self.task.rows.segment()
        if entry is not None:
            seg["checkpoint"] = np.array(json.dumps(entry))
        if self.trace is not None:
            seg.update({f"t_{k}": v for k, v in self.trace.flush().items()})
        with io.atomic_path(self.paths.segment(step)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **seg)


def train_run(
    root,
    hparams: dict,
    device: str = "cpu",
    data_dir: str = "data",
    threads: int = 1,
    progress: bool = True,
    callbacks: tuple = (),
) -> dict:
    """Train (or resume) the run described by ``hparams`` into directory ``root``.

    The loop is :class:`pipeline.train.engine.Engine` over a :class:`RunTask`; ``callbacks`` are
    engine callbacks (hooks ``on_epoch_start(run)``, ``on_resume(run)``, ``before_update(run)``,
    ... with the model and optimizer on ``run.task``), e.g. teleportation's. The mechanics trace
    (``train.mechanics``) is one of them.
    """
    paths = RunPaths(Path(root))
    torch.set_num_threads(threads)
    h = TrainHparams(**hparams["train"])
    c = CheckpointHparams(**hparams["checkpoints"])
    seed = hparams["seed"]
    paths.root.mkdir(parents=True, exist_ok=True)
    io.write_json(paths.hparams, hparams)

    dev, dtype, data = placed_data(hparams, device, data_dir)
    model = run_model(hparams, data, seed, dtype, dev)
    model.train()
    optimizer = make_optimizer(model.named_parameters(), h)
    task = RunTask(
        model,
        optimizer,
        Schedule(h),
        loss_fn(h.loss),
        data,
        h,
        seed,
        dev,
        _model_info(model, data),
        where=str(paths.root),
    )
    trace = (
        MechanicsTrace(model, neuron_structure(model, data.input_shape), optimizer, h)
        if h.mechanics
        else None
    )
    if task.steps_per_epoch == 0 and h.epochs:
        raise ValueError(
            f"train.batch_size {h.batch_size} exceeds the {len(data.train)} training examples "
            "(with drop_last)"
        )
    segments = _Segments(paths, task, trace)
    run = Engine(
        task,
        h.epochs,
        store=ResumeStore(paths.checkpoints, c.keep_last),
        save_steps=checkpoint_steps(c, task.steps_per_epoch, h.epochs),
        callbacks=(segments, *callbacks, *([trace] if trace is not None else [])),
        fingerprint=run_fingerprint(hparams),
        rng_seed=seeding.derive(seed, "train"),  # dropout & co.; a resume restores it
        on_nan=h.on_nan,
        where=str(paths.root),
        progress=progress,
    )
    started = time.perf_counter()
    run.run()
    elapsed = time.perf_counter() - started
    if run.status == "diverged":  # the rows since the last checkpoint
        segments.write(run.step)
    return _finish(
        paths, model, trace, run.status, run.step, run.epoch, elapsed, run.step - run.first_step
    )


def _model_info(model, data) -> dict:
    """What downstream stages need to read a checkpoint without rebuilding data or model."""
    from pipeline.models.structure import StructureError

    try:
        neurons = neuron_structure(model, data.input_shape).to_json()
    except StructureError as err:
        log.warning("no neuron structure for this model: %s", err)
        neurons = None
    return {
        "input_shape": list(data.input_shape),
        "num_classes": data.num_outputs,
        "param_names": [n for n, _ in model.named_parameters()],
        "structure": neurons,
    }


def _load_segments(paths: RunPaths) -> tuple[dict[str, np.ndarray], list[dict]]:
    """All segments' rows, concatenated, and the checkpoint manifest entries they carry."""
    parts: dict[str, list] = {}
    manifest = []
    for f in sorted(paths.segments.glob("[!.]*.npz")):
        with np.load(f, allow_pickle=False) as seg:
            for k in seg.files:
                if k == "checkpoint":
                    manifest.append(json.loads(str(seg[k])))
                else:
                    parts.setdefault(k, []).append(seg[k])
    return {k: np.concatenate(v) for k, v in parts.items()}, manifest


def _finish(paths, model, trace, status, step, epoch, elapsed, steps_run) -> dict:
    seg, manifest = _load_segments(paths)
    manifest = [e for e in manifest if (paths.root / e["file"]).is_file()]  # keep_last
    history = {
        "step": seg["h_step"],
        "epoch": seg["h_epoch"],
        "split": seg["h_split"],
        "loss": seg["h_loss"],
        "accuracy": seg["h_accuracy"],
        "lr": seg["h_lr"],
    }
    # pandas reads ``split`` back as a categorical of SPLITS (writing it takes no pandas import)
    io.write_columns(paths.history, history, categories={"split": SPLITS})
    if trace is not None:
        _write_trace(paths.trace, trace, seg)
    io.write_json(paths.manifest, manifest)
    io.save_torch(paths.final, {"model": model.state_dict()})
    evals = np.flatnonzero(history["split"] != SPLITS.index("train"))
    last = evals[history["step"][evals] == history["step"][evals].max()] if len(evals) else []
    final = {
        f"{SPLITS[history['split'][i]]}_{m}": float(history[m][i])
        for i in last
        for m in ("loss", "accuracy")
    }
    summary = {
        "status": status,
        "steps": int(step),
        "epochs_done": int(epoch),
        "final_metrics": final,
        "seconds": elapsed,
        "steps_per_second": steps_run / elapsed if elapsed > 0 and steps_run else None,
    }
    io.write_json(paths.summary, summary)
    return summary


def _write_trace(path: Path, trace: MechanicsTrace, seg: dict) -> None:
    with io.atomic_path(path, ".h5") as tmp:
        with io.open_h5(tmp, "w") as f:
            f.attrs["layout"] = json.dumps(trace.layout())
            f.attrs["output"] = json.dumps(
                trace.output.__dict__ if trace.output is not None else None
            )
            f.attrs["update"] = trace.kind
            for key in ("g2", "u2", "colsum"):
                data = seg.get(f"t_{key}")
                if data is not None:
                    chunked = (  # none for zero columns (a model without hidden neurons)
                        {"compression": "lzf", "chunks": (min(len(data), 1024), *data.shape[1:])}
                        if data.size
                        else {}
                    )
                    f.create_dataset(key, data=data, **chunked)
            f.create_dataset("step", data=np.arange(len(seg.get("t_g2", []))))
