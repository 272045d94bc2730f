"""The one training loop: a science supplies its step (a :class:`Task`), the engine runs it.

Every kind of training in the pipeline - one run, a vectorised zoo, a stack of students, a
masked lottery level, a stitching layer, a weight mask - is a task on this engine. Per update::

    out = task.forward_backward(batch)     # loss and gradients of one batch
    callbacks.before_update(run)           # e.g. the mechanics trace, gradient masks
    task.update()                          # the optimizer step
    callbacks.after_update(run, out)       # e.g. history rows, weight masks (run.step does
                                           # not count this update yet: it is step + 1 after it)
    step += 1; task.check(out, ...)        # divergence: error, or end the run as "diverged"
    at the epoch's last batch: metrics = task.end_epoch(epoch); callbacks.on_epoch_end(run)
    at a scheduled step: save the resume state (callbacks.on_save(run, metrics, resume_only) first)
    on a stop request (SIGTERM): save a resume-only state and raise TrainingStopped

Resume state, one format for every task: one file per saved step,
``{store.folder}/step{step:09d}.pt`` holding ``fingerprint``, ``step``, ``epoch``, ``batch``,
``metrics`` (the epoch-end metrics when the save is at an epoch end, else ``{}``), ``rng``
(torch's CPU and CUDA generator states), ``resume_only``, ``callbacks`` (``{name:
state_dict()}`` of the callbacks that have state) and the task's own entries
(``task.state_dict()``, merged at the top level, so a run's checkpoints carry ``model`` for the
stages that read them). A run finds the newest valid file written for its fingerprint, drops
later ones (and half-written temporaries), and goes on; with batches derived from ``(seed,
epoch)`` and the RNG state restored, a resumed CPU run ends bit-identical to an uninterrupted one.

A *resume-only* state (written on a stop request between scheduled saves) is not part of the
run's record: it is deleted at the next scheduled save and when the run ends.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from pipeline import io
from pipeline.train.stop import StopRequest

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError, FloatingPointError):
    """The training loss became NaN or infinite (``task.check`` said so)."""


class Task(Protocol):
    """One kind of training: what the engine needs from a science.

    Optional methods (the engine calls them when present): ``end_epoch(epoch) -> dict``
    (evaluation, schedule; the returned metrics go into an epoch-end save), ``check(out,
    epoch_end) -> str | None`` (a message when the loss is not finite), ``finished() -> bool``
    (stop before the next epoch, e.g. every student converged), ``begin() -> dict`` (a fresh
    start's step-0 metrics, when step 0 is saved). ``state_dict``/``load_state_dict`` are called
    only when the engine has a store (a task run with ``store=None`` may lack them).
    """

    steps_per_epoch: int

    def batches(self, epoch: int, start: int) -> Iterable: ...

    def forward_backward(self, batch) -> Any: ...

    def update(self) -> None: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class ResumeStore:
    """Resume states of one training, ``folder/step{step:09d}.pt``; ``keep_last``: how many
    scheduled states to keep (0: all; resume-only ones are deleted when superseded)."""

    folder: Path
    keep_last: int = 0
    resume_only: list[Path] = field(default_factory=list)

    def path(self, step: int) -> Path:
        return Path(self.folder) / f"step{step:09d}.pt"

    def files(self) -> list[Path]:
        folder = Path(self.folder)
        return sorted(folder.glob("step*.pt")) if folder.is_dir() else []

    def write(self, step: int, state: dict, resume_only: bool) -> None:
        io.save_torch(self.path(step), {**state, "resume_only": resume_only})
        for old in self.resume_only:  # superseded by the state just written
            if old != self.path(step):
                old.unlink(missing_ok=True)
        self.resume_only = [self.path(step)] if resume_only else []
        if self.keep_last:
            kept = [f for f in self.files() if f not in self.resume_only]
            for old in kept[: -self.keep_last]:
                old.unlink()

    def newest(self, fingerprint: str, where) -> dict | None:
        """The newest readable state written for ``fingerprint``; deletes states after it and
        half-written temporaries. ``None`` (and every state deleted) if there is none."""
        for path in reversed(self.files()):
            try:
                state = io.load_torch(path)
            except io.ArtifactError as err:
                log.warning("skipping unusable resume state: %s", err)
                path.unlink()
                continue
            if state.get("fingerprint") != fingerprint:
                log.warning("%s: resume states of other hyperparameters; starting over", where)
                break
            self.drop_after(state["step"])
            if state.get("resume_only"):
                self.resume_only = [path]
            return state
        self.drop_after(-1)
        return None

    def drop_after(self, step: int) -> None:
        drop_after(self.folder, step, "step*.pt", "step")

    def clear_resume_only(self) -> None:
        for old in self.resume_only:
            old.unlink(missing_ok=True)
        self.resume_only = []


def drop_after(folder, step: int, pattern: str, prefix: str = "") -> None:
    """In ``folder``: delete the files ``pattern`` matches whose step (their stem after
    ``prefix``) is past ``step``, and the temporaries of killed writes (``io.atomic_path``'s
    dot-files). Resume states and a run's history segments are pruned alike on resume."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    for f in folder.iterdir():
        if f.name.startswith("."):
            f.unlink()
    for f in folder.glob(pattern):
        if int(f.stem.removeprefix(prefix)) > step:
            f.unlink()


def _call(callbacks, hook: str, *args) -> None:
    for cb in callbacks:
        method = getattr(cb, hook, None)
        if method is not None:
            method(*args)


class Engine:
    """Runs ``task`` for ``epochs`` epochs of ``task.steps_per_epoch`` updates.

    ``store``: where resume states go (``None``: no saves, nothing resumed); ``save_steps``:
    the steps (updates done, 0 = before the first) after which a state is saved; ``fingerprint``:
    written into every state, a state of another fingerprint is not resumed; ``rng_seed``: a
    fresh start seeds torch's generator with it (dropout and the like), a resume restores the
    saved generator state; ``on_nan``: ``error`` (raise :class:`TrainingDiverged` with the
    task's message) or ``record`` (end the run with status ``diverged``); ``where``: the name
    in messages and on the progress bar; ``progress``: show a tqdm bar (stderr);
    ``start``: ``(epoch, batch, step)`` of a fresh start (a rewound lottery level starts
    mid-training).

    After :meth:`run`: ``status`` (``completed`` | ``diverged``), ``epoch``, ``batch``, ``step``,
    ``first_step`` (where this process started), ``metrics`` (of the last epoch end).
    """

    def __init__(
        self,
        task,
        epochs: int,
        store: ResumeStore | None = None,
        save_steps: Iterable[int] = (),
        callbacks: Iterable = (),
        fingerprint: str = "",
        rng_seed: int | None = None,
        on_nan: str = "error",
        where: str = "training",
        progress: bool = False,
        start: tuple[int, int, int] = (0, 0, 0),
    ):
        if on_nan not in ("error", "record"):
            raise ValueError(f"on_nan: {on_nan!r} not allowed; allowed: error, record")
        self.task, self.epochs, self.store = task, epochs, store
        self.save_steps = set(save_steps)
        self.callbacks = tuple(callbacks)
        self.fingerprint, self.rng_seed, self.on_nan = fingerprint, rng_seed, on_nan
        self.where, self.progress = where, progress
        self.epoch, self.batch, self.step = start
        self.first_step = self.step
        self.status, self.metrics, self.resumed = "completed", {}, False

    @property
    def total_steps(self) -> int:
        return self.task.steps_per_epoch * self.epochs

    # -- resume state ------------------------------------------------------------------------
    def state(self, metrics: dict) -> dict:
        return {
            **self.task.state_dict(),
            "fingerprint": self.fingerprint,
            "step": self.step,
            "epoch": self.epoch,
            "batch": self.batch,
            "metrics": metrics,
            "rng": {
                "torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            },
            "callbacks": {
                type(cb).__name__: cb.state_dict()
                for cb in self.callbacks
                if hasattr(cb, "state_dict")
            },
        }

    def save(self, metrics: dict, resume_only: bool = False) -> None:
        _call(self.callbacks, "on_save", self, metrics, resume_only)
        self.store.write(self.step, self.state(metrics), resume_only)

    def _resume(self) -> bool:
        if self.store is None:
            return False
        state = self.store.newest(self.fingerprint, self.where)
        if state is None:
            return False
        self.task.load_state_dict(state)
        for cb in self.callbacks:
            if hasattr(cb, "load_state_dict"):
                cb.load_state_dict(state["callbacks"][type(cb).__name__])
        torch.set_rng_state(state["rng"]["torch"].cpu())
        if state["rng"]["cuda"]:
            torch.cuda.set_rng_state_all(state["rng"]["cuda"])
        self.step, self.epoch, self.batch = state["step"], state["epoch"], state["batch"]
        self.first_step = self.step
        log.info("resuming %s from step %d", self.where, self.step)
        return True

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> Engine:
        """Resume or start, train to the end (or divergence, or a stop request)."""
        task, cbs = self.task, self.callbacks
        self.resumed = self._resume()
        if self.resumed:
            _call(cbs, "on_resume", self)
        else:
            if self.rng_seed is not None:
                torch.manual_seed(self.rng_seed)
            _call(cbs, "on_start", self)
            if self.store is not None and self.step in self.save_steps:
                self.save(task.begin() if hasattr(task, "begin") else {})
        per_epoch, total = task.steps_per_epoch, self.total_steps
        if per_epoch < 1 and self.epoch < self.epochs:
            raise ValueError(f"{self.where}: an epoch has no batches (steps per epoch {per_epoch})")
        check = getattr(task, "check", None)
        bar = self._bar()
        stop = StopRequest().install()
        try:
            while self.epoch < self.epochs and self.status == "completed":
                if self.batch == 0:
                    if hasattr(task, "finished") and task.finished():
                        break
                    _call(cbs, "on_epoch_start", self)
                for batch in task.batches(self.epoch, self.batch):
                    out = task.forward_backward(batch)
                    _call(cbs, "before_update", self)
                    task.update()
                    _call(cbs, "after_update", self, out)
                    self.step, self.batch = self.step + 1, self.batch + 1
                    bar.update(1)
                    epoch_end = self.batch == per_epoch
                    message = check(out, epoch_end) if check is not None else None
                    if message is not None:
                        self._diverged(message)
                        break
                    metrics = {}
                    if epoch_end:
                        metrics = task.end_epoch(self.epoch) if hasattr(task, "end_epoch") else {}
                        self.metrics = metrics or {}
                        self.epoch, self.batch = self.epoch + 1, 0
                    saved = self.store is not None and self.step in self.save_steps
                    if saved:
                        self.save(metrics or {})
                    if epoch_end:
                        _call(cbs, "on_epoch_end", self)
                    if stop and self.step < total:
                        if self.store is None:
                            raise stop.error(f"at step {self.step} of {self.where}", False)
                        if not saved:
                            self.save({}, resume_only=True)
                        raise stop.error(
                            f"at step {self.step} of {self.where} (checkpoint written)"
                        )
        finally:
            stop.restore()
            bar.close()
        if self.store is not None:
            self.store.clear_resume_only()
        _call(cbs, "on_end", self)
        return self

    def _diverged(self, message: str) -> None:
        if self.on_nan == "error":
            raise TrainingDiverged(message)
        log.warning(message)
        self.status = "diverged"

    def _bar(self):
        if not self.progress:
            return _NoBar()
        from tqdm import tqdm

        return tqdm(
            total=self.total_steps,
            initial=self.step,
            desc=str(self.where),
            file=sys.stderr,
            mininterval=2.0,
            unit="step",
        )


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def batches_from(iterator: Iterator, count: int) -> Iterator:
    """The next ``count`` items of an endless batch stream (step-counted tasks: one 'epoch')."""
    for _ in range(count):
        yield next(iterator)
