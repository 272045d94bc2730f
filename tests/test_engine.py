"""The training engine: resume at any step ends bit-identical, schedules of saves, resume-only
states, divergence policies, callback order and state - on a small task drawn at random."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import seeding
from pipeline.train.engine import Engine, ResumeStore, TrainingDiverged, batches_from
from pipeline.train.stop import TrainingStopped

pytestmark = pytest.mark.usefixtures("one_thread")


class Regression:
    """Least squares with dropout on the inputs (it consumes torch's global RNG), SGD with
    momentum; batches of epoch ``e`` from ``(seed, e)``."""

    def __init__(self, n=24, d=5, batch=4, seed=0, lr=0.05, poison_step=None):
        gen = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, d, dtype=torch.float64, generator=gen)
        self.y = self.x @ torch.randn(d, dtype=torch.float64, generator=gen)
        self.w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
        self.opt = torch.optim.SGD([self.w], lr=lr, momentum=0.9)
        self.batch, self.seed = batch, seed
        self.steps_per_epoch = n // batch
        self.poison_step, self.updates, self.ends = poison_step, 0, []

    def batches(self, epoch, start):
        order = torch.randperm(len(self.x), generator=seeding.generator(self.seed, "o", epoch))
        for b in range(start, self.steps_per_epoch):
            idx = order[b * self.batch : (b + 1) * self.batch]
            yield self.x[idx], self.y[idx]

    def forward_backward(self, batch):
        x, y = batch
        self.opt.zero_grad()
        x = torch.nn.functional.dropout(x, 0.3)
        loss = ((x @ self.w - y) ** 2).mean()
        if self.updates == self.poison_step:
            loss = loss * float("nan")
        loss.backward()
        return loss

    def update(self):
        self.opt.step()
        self.updates += 1

    def check(self, out, epoch_end):
        return None if torch.isfinite(out) else f"loss {float(out.detach())}"

    def end_epoch(self, epoch):
        self.ends.append(epoch)
        return {"w0": float(self.w[0].detach())}

    def state_dict(self):
        return {"w": self.w.detach().clone(), "opt": self.opt.state_dict(), "u": self.updates}

    def load_state_dict(self, state):
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.opt.load_state_dict(state["opt"])
        self.updates = state["u"]


class Counter:
    """A callback with state: counts updates; records the hook order."""

    def __init__(self):
        self.count, self.calls = 0, []

    def on_start(self, run):
        self.calls.append("start")

    def on_resume(self, run):
        self.calls.append(("resume", run.step))

    def on_epoch_start(self, run):
        self.calls.append(("epoch", run.epoch))

    def before_update(self, run):
        self.calls.append("before")

    def after_update(self, run, out):
        self.count += 1
        self.calls.append("after")

    def state_dict(self):
        return {"count": self.count}

    def load_state_dict(self, state):
        self.count = state["count"]


class StopAt:
    """Sends the stop request (as SIGTERM's handler would) once ``step`` updates are done."""

    def __init__(self, step):
        self.step = step

    def after_update(self, run, out):
        if run.step + 1 == self.step:
            import os
            import signal

            os.kill(os.getpid(), signal.SIGTERM)


def _engine(tmp_path, epochs, every, keep_last=0, callbacks=(), **task):
    task = Regression(**task)
    saves = set(range(0, task.steps_per_epoch * epochs + 1, every)) | {
        task.steps_per_epoch * epochs
    }
    return Engine(
        task,
        epochs,
        store=ResumeStore(tmp_path / "states", keep_last),
        save_steps=saves,
        callbacks=callbacks,
        fingerprint="f",
        rng_seed=7,
        where="toy",
    )


@settings(max_examples=12, deadline=None)
@given(
    epochs=st.integers(1, 4),
    every=st.integers(1, 9),
    stop=st.integers(1, 23),
    keep_last=st.integers(0, 2),
    seed=st.integers(0, 2**16),
)
def test_a_stopped_run_resumes_bit_identical(
    tmp_path_factory, epochs, every, stop, keep_last, seed
):
    """Stop at a drawn step (a resume-only state when it falls between saves), run again: the
    weights, the optimizer, the callback's state and the end-of-epoch calls equal an
    uninterrupted run's; no resume-only state is left; keep_last holds."""
    ref_dir, cut_dir = tmp_path_factory.mktemp("ref"), tmp_path_factory.mktemp("cut")
    ref_count = Counter()
    ref = _engine(ref_dir, epochs, every, keep_last, (ref_count,), seed=seed).run()
    total = ref.total_steps
    stop = min(stop, total)
    first, count = Counter(), Counter()
    if stop < total:
        with pytest.raises(TrainingStopped, match=f"at step {stop} of toy"):
            _engine(cut_dir, epochs, every, keep_last, (first, StopAt(stop)), seed=seed).run()
        assert first.count == stop
    torch.manual_seed(seed + 1)  # a new process: the generator state comes from the saved state
    resumed = _engine(cut_dir, epochs, every, keep_last, (count,), seed=seed).run()
    assert torch.equal(resumed.task.w, ref.task.w)
    assert resumed.task.opt.state_dict()["state"][0]["momentum_buffer"].equal(
        ref.task.opt.state_dict()["state"][0]["momentum_buffer"]
    )
    assert count.count == ref_count.count == total
    assert resumed.task.ends == [e for e in ref.task.ends if e >= resumed.task.ends[0]]
    files = sorted(p.name for p in (cut_dir / "states").glob("step*.pt"))
    scheduled = sorted(f"step{s:09d}.pt" for s in ref.save_steps)
    assert files == (scheduled[-keep_last:] if keep_last else scheduled)
    assert (resumed.step, resumed.epoch, resumed.batch) == (total, epochs, 0)


def test_hooks_in_order_and_step_zero_saved(tmp_path):
    cb = Counter()
    run = _engine(tmp_path, 1, 3, callbacks=(cb,), n=8, batch=4).run()
    assert cb.calls == ["start", ("epoch", 0), "before", "after", "before", "after"]
    assert run.store.path(0).is_file() and run.metrics == {"w0": float(run.task.w[0].detach())}
    cb2 = Counter()
    again = _engine(tmp_path, 2, 3, callbacks=(cb2,), n=8, batch=4)
    again.fingerprint = "other"  # states of other hyperparameters: start over
    again.run()
    assert cb2.calls[0] == "start" and cb2.count == 4


@pytest.mark.parametrize("policy", ["error", "record"])
def test_divergence_policy(tmp_path, policy):
    task = Regression(poison_step=5)
    run = Engine(task, 3, on_nan=policy, where="toy")
    if policy == "error":
        with pytest.raises(TrainingDiverged, match="loss nan") as err:
            run.run()
        assert isinstance(err.value, FloatingPointError)
        return
    run.run()
    assert (run.status, run.step, task.updates) == ("diverged", 6, 6)


def test_a_stop_without_a_store_says_the_job_starts_over_and_empty_epochs_are_refused():
    task = Regression()
    with pytest.raises(TrainingStopped, match="at step 3 of toy; run the job again to start"):
        Engine(task, 2, callbacks=(StopAt(3),), where="toy").run()
    task.steps_per_epoch = 0
    with pytest.raises(ValueError, match="toy: an epoch has no batches"):
        Engine(task, 1, where="toy").run()


def test_a_fresh_start_seeds_the_generator(tmp_path):
    a = Engine(Regression(), 2, rng_seed=3).run()
    b = Engine(Regression(), 2, rng_seed=3).run()
    c = Engine(Regression(), 2, rng_seed=4).run()
    assert torch.equal(a.task.w, b.task.w) and not torch.equal(a.task.w, c.task.w)


def test_step_counted_tasks_read_an_endless_stream():
    stream = iter(range(100))
    assert list(batches_from(stream, 3)) == [0, 1, 2] and next(stream) == 3
