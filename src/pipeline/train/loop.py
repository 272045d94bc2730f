"""The training loop: one run from its hyperparameters to its files, resumable after a kill.

Layout of a run directory (``results/{study}/runs/{run}/``)::

    hparams.json        every hyperparameter, resolved (declared output)
    summary.json        status (completed / diverged), final metrics, speed (declared output)
    final.pt            final weights (declared output)
    history.parquet     per-step train loss/accuracy/lr and per-epoch eval metrics (declared)
    checkpoints.json    the checkpoint manifest extract reads (declared output)
    trace.h5            per-step mechanics trace, when asked for (declared output)
    checkpoints/        step*.pt: weights, optimizer, schedule, RNG state, step (resume state)
    segments/           *.npz: history and trace rows up to each checkpoint (resume state)

Snakemake deletes declared outputs before it re-runs a job, never ``checkpoints/`` or
``segments/``: a re-run finds the newest valid checkpoint, drops segments after it, and goes on.
A job asked to stop (SIGTERM, see :mod:`pipeline.train.stop`) writes a *resume-only*
checkpoint at the step it reached, outside the manifest, and exits; the resumed run deletes it
at its next scheduled checkpoint, so the outputs equal an uninterrupted run's.
Each epoch's batch order derives from ``(seed, epoch)`` and dropout's RNG state is checkpointed,
so with a fixed thread count a resumed CPU run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from pipeline import devices, io, seeding
from pipeline.config import CheckpointHparams, DatasetHparams, TrainHparams, run_fingerprint
from pipeline.data import load as load_data
from pipeline.models import build, neuron_structure
from pipeline.train.optim import Schedule, loss_fn, make_optimizer, predictions
from pipeline.train.schedule import checkpoint_steps
from pipeline.train.stop import StopRequest
from pipeline.train.trace import MechanicsTrace

log = logging.getLogger(__name__)
SPLITS = ("train", "val", "test")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class TrainingDiverged(RuntimeError):
    """The training loss became NaN or infinite."""


@dataclass(frozen=True)
class RunPaths:
    root: Path

    def __getattr__(self, name):
        files = {
            "hparams": "hparams.json",
            "summary": "summary.json",
            "final": "final.pt",
            "history": "history.parquet",
            "manifest": "checkpoints.json",
            "trace": "trace.h5",
            "checkpoints": "checkpoints",
            "segments": "segments",
        }
        if name in files:
            return self.root / files[name]
        raise AttributeError(name)

    def checkpoint(self, step: int) -> Path:
        return self.checkpoints / f"step{step:09d}.pt"

    def segment(self, step: int) -> Path:
        return self.segments / f"{step:09d}.npz"


@torch.no_grad()
def evaluate(model, split, loss, batch_size) -> tuple[float, float]:
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

    ``callbacks``: objects with optional methods ``on_epoch_start(epoch, model, optimizer,
    seed)``, called before the first batch of every epoch (also when a resumed run restarts at an
    epoch boundary; never again for an epoch whose first batch is already in a checkpoint), and
    ``on_resume(epoch, batch, model, optimizer, seed)``, called once after a checkpoint at
    (``epoch``, ``batch``) was loaded, so a science (e.g. teleportation) can act on the model and
    optimizer state in place, reproducibly.
    """
    paths = RunPaths(Path(root))
    torch.set_num_threads(threads)
    h = TrainHparams(**hparams["train"])
    c = CheckpointHparams(**hparams["checkpoints"])
    d = DatasetHparams(**hparams["dataset"])
    seed, fp = hparams["seed"], run_fingerprint(hparams)
    dev = devices.resolve(device)
    dtype = DTYPES[h.dtype]
    paths.root.mkdir(parents=True, exist_ok=True)
    io.write_json(paths.hparams, hparams)

    data = load_data(d.name, data_dir, d.val_fraction, d.subset, dev, dtype)
    options = {k: v for k, v in hparams["model"].items() if k != "name"}
    model = build(
        hparams["model"]["name"], data.input_shape, data.num_outputs, options, seed, dtype
    ).to(dev)
    model.train()
    optimizer = make_optimizer(model.named_parameters(), h)
    sched = Schedule(h)
    loss = loss_fn(h.loss)
    info = _model_info(model, data)
    trace = (
        MechanicsTrace(model, neuron_structure(model, data.input_shape), optimizer, h)
        if (h.mechanics)
        else None
    )
    per_epoch = data.train.num_batches(h.batch_size, h.drop_last)
    if per_epoch == 0 and h.epochs:
        raise ValueError(
            f"train.batch_size {h.batch_size} exceeds the {len(data.train)} training examples "
            "(with drop_last)"
        )
    total = per_epoch * h.epochs
    to_save = checkpoint_steps(c, per_epoch, h.epochs)
    rows = _Rows()

    def measure(step, epoch) -> dict:
        metrics = {}
        for split, part in data.eval_splits().items():
            lo, ac = evaluate(model, part, loss, h.eval_batch_size)
            metrics[f"{split}_loss"], metrics[f"{split}_accuracy"] = lo, ac
            rows.add_eval((step, epoch, SPLITS.index(split), lo, ac, sched.lr))
        return metrics

    resume_only: list[Path] = []  # resume-only checkpoints still on disk

    def save(step, epoch, batch, metrics, for_resume=False):
        """Write a segment and a checkpoint; ``for_resume``: one outside the manifest."""
        seg = rows.segment()
        if not for_resume:
            seg["checkpoint"] = np.array(
                json.dumps(
                    {
                        "step": step,
                        "epoch": epoch,
                        "file": str(paths.checkpoint(step).relative_to(paths.root)),
                        "metrics": metrics,
                    }
                )
            )
        if trace is not None:
            seg.update({f"t_{k}": v for k, v in trace.flush().items()})
        with io.atomic_path(paths.segment(step)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **seg)
        io.save_torch(
            paths.checkpoint(step),
            {
                "step": step,
                "epoch": epoch,
                "batch": batch,
                "fingerprint": fp,
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "schedule": sched.state_dict(),
                "metrics": metrics,
                "info": info,
                "rng": {
                    "torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state_all() if dev.type == "cuda" else [],
                },
                "resume_only": for_resume,
            },
        )
        for old in resume_only:  # superseded by the checkpoint just written
            old.unlink(missing_ok=True)
        resume_only[:] = [paths.checkpoint(step)] if for_resume else []
        if c.keep_last:
            kept = [f for f in sorted(paths.checkpoints.glob("step*.pt")) if f not in resume_only]
            for old in kept[: -c.keep_last]:
                old.unlink()

    step, epoch, batch, resumed_from = _resume(paths, fp, model, optimizer, sched, dev)
    if resumed_from is not None:
        resume_only.append(resumed_from)
    if step is not None:
        for cb in callbacks:
            if hasattr(cb, "on_resume"):
                cb.on_resume(epoch, batch, model, optimizer, seed)
    else:
        step, epoch, batch = 0, 0, 0
        torch.manual_seed(seeding.derive(seed, "train"))  # dropout & co.; a resume restores it
        if 0 in to_save:
            save(0, 0, 0, measure(0, 0))
    Schedule.apply(optimizer, sched.lr)

    status, started, first = "completed", time.perf_counter(), step
    # on the CPU reading the loss costs nothing; on accelerators it syncs, so check in batches
    host = dev.type == "cpu"
    check_every = 1 if host else 25
    bar = _progress(total, step, paths.root, progress)
    stop = StopRequest().install()
    try:
        while epoch < h.epochs and status == "completed":
            if batch == 0:
                for cb in callbacks:
                    if hasattr(cb, "on_epoch_start"):
                        cb.on_epoch_start(epoch, model, optimizer, seed)
            batches = data.train.train_batches(
                h.batch_size, h.drop_last, seed, epoch, batch, h.augment
            )
            for x, y in batches:
                optimizer.zero_grad(set_to_none=True)
                out = model(x)
                value = loss(out, y)
                value.backward()
                if trace is not None:
                    trace.before_step()
                optimizer.step()
                if trace is not None:
                    trace.after_step(sched.lr)
                if devices.is_xla(dev):
                    devices.sync(dev)
                loss_value = value.item() if host else value.detach()
                rows.train.append(
                    (
                        step,
                        epoch,
                        loss_value,
                        predictions(out.detach(), y).to(dtype).mean(),
                        sched.lr,
                    )
                )
                step, batch = step + 1, batch + 1
                bar.update(1)
                if host:
                    finite = math.isfinite(loss_value)
                elif step % check_every == 0 or batch == per_epoch:
                    finite = bool(
                        torch.isfinite(torch.stack([r[2] for r in rows.train[-check_every:]])).all()
                    )
                else:
                    finite = True
                if not finite:
                    status = _diverged(h, paths, step, epoch)
                    break
                if batch == per_epoch:
                    metrics = measure(step, epoch + 1)
                    Schedule.apply(optimizer, sched.end_epoch(epoch, metrics))
                    epoch, batch = epoch + 1, 0
                    if step in to_save:
                        save(step, epoch, batch, metrics)
                elif step in to_save:
                    save(step, epoch, batch, {})
                if stop and step < total:
                    if step not in to_save:
                        save(step, epoch, batch, {}, for_resume=True)
                    raise stop.error(f"at step {step} of {paths.root} (checkpoint written)")
    finally:
        stop.restore()
        bar.close()
    for old in resume_only:  # a diverged run ends without a further checkpoint
        old.unlink(missing_ok=True)
    if status == "diverged":
        seg = rows.segment()
        if trace is not None:
            seg.update({f"t_{k}": v for k, v in trace.flush().items()})
        with io.atomic_path(paths.segment(step)) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **seg)
    elapsed = time.perf_counter() - started
    return _finish(paths, model, trace, status, step, epoch, elapsed, step - first)


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


def _progress(total, initial, root, enabled):
    from tqdm import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc=str(root),
        file=sys.stderr,
        mininterval=2.0,
        disable=not enabled,
        unit="step",
    )


def _diverged(h: TrainHparams, paths: RunPaths, step: int, epoch: int) -> str:
    message = (
        f"{paths.root}: training loss became NaN/inf by step {step} (epoch {epoch}); lower "
        "train.lr, or set train.on_nan: record to end such runs as diverged and go on"
    )
    if h.on_nan == "error":
        raise TrainingDiverged(message)
    log.warning(message)
    return "diverged"


def _resume(paths: RunPaths, fp: str, model, optimizer, sched, dev):
    """Load the newest valid checkpoint; drop later segments. ``(None, ...)`` if none.

    Returns ``(step, epoch, batch, path)``; ``path`` is the checkpoint's file if it was written
    for resuming only (the run deletes it at its next checkpoint), else ``None``."""
    found = (
        sorted(paths.checkpoints.glob("step*.pt"), reverse=True)
        if paths.checkpoints.is_dir()
        else []
    )
    for path in found:
        try:
            state = io.load_torch(path)
        except io.ArtifactError as err:
            log.warning("skipping unusable checkpoint: %s", err)
            path.unlink()
            continue
        if state.get("fingerprint") != fp:
            log.warning(
                "%s: checkpoints were written for other hyperparameters; starting over", paths.root
            )
            break
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        step = state["step"]
        _drop_after(paths, step)
        log.info("resuming %s from step %d", paths.root, step)
        return step, state["epoch"], state["batch"], path if state.get("resume_only") else None
    _drop_after(paths, -1)
    return None, 0, 0, None


def _drop_after(paths: RunPaths, step: int) -> None:
    """Delete checkpoints and segments past ``step``, and half-written files of a killed write."""
    for folder, pattern in ((paths.checkpoints, "step*.pt"), (paths.segments, "*.npz")):
        if folder.is_dir():
            for f in folder.iterdir():
                if f.name.startswith("."):  # io.atomic_path's temporary, never renamed
                    f.unlink()
            for f in folder.glob(pattern):
                if int(f.stem.removeprefix("step")) > step:
                    f.unlink()


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
