"""Training: checkpoints, schedules, divergence, and bit-identical resume after a real SIGKILL or
a stop request (SIGTERM/SIGUSR1: the job writes a checkpoint and exits)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import io, layout
from pipeline.config import CheckpointHparams, TrainHparams, expand_runs
from pipeline.layout import RUN_FILES
from pipeline.train.loop import TrainingDiverged, train_run
from pipeline.train.optim import Schedule
from pipeline.train.schedule import checkpoint_steps

STUDY = {
    "kind": "train",
    "dataset": {"name": "digits"},
    "model": {"name": "mlp", "widths": [24, 24], "batch_norm": True, "dropout": 0.2},
    "train": {
        "lr": 0.05,
        "momentum": 0.9,
        "wd": 5e-4,
        "batch_size": 16,
        "epochs": 3,
        "mechanics": True,
    },
    "checkpoints": {"every_steps": 40},
}


def hparams(**train):
    study = {**STUDY, "train": {**STUDY["train"], **train}}
    return expand_runs("t", study)[0].hparams


def test_checkpoint_schedule():
    c = CheckpointHparams(step0=True, every_steps=7, epoch_end=True, log_spaced=4)
    steps = checkpoint_steps(c, steps_per_epoch=10, epochs=3)
    assert {0, 7, 14, 21, 28, 10, 20, 30, 1} <= steps and max(steps) == 30
    assert checkpoint_steps(CheckpointHparams(step0=False, epoch_end=False), 10, 2) == {20}


def test_schedules():
    def lrs(**kw):
        sched = Schedule(TrainHparams(lr=1.0, **kw))
        return [sched.end_epoch(e, {"val_accuracy": 0.5}) for e in range(6)]

    assert lrs(schedule="step", step_size=2, gamma=0.5) == [1, 0.5, 0.5, 0.25, 0.25, 0.125]
    assert lrs(schedule="multistep", milestones=(1, 4), gamma=0.1)[:5] == pytest.approx(
        [0.1, 0.1, 0.1, 0.01, 0.01]
    )
    # plateau: no improvement after the first epoch; patience 1 -> drop every second epoch
    assert lrs(schedule="plateau", plateau_patience=1, plateau_factor=0.5) == [
        1,
        1,
        0.5,
        0.5,
        0.25,
        0.25,
    ]


def test_run_outputs(tmp_path):
    summary = train_run(tmp_path / "run", hparams(epochs=1), progress=False)
    run = tmp_path / "run"
    assert summary["status"] == "completed" and summary["steps"] == 84
    hist = pd.read_parquet(run / "history.parquet")
    train = hist[hist.split == "train"]
    assert train.step.tolist() == list(range(84))
    assert set(hist.split.unique()) == {"train", "val", "test"}
    manifest = io.read_json(run / "checkpoints.json")
    assert [e["step"] for e in manifest] == [0, 40, 80, 84]
    assert manifest[0]["metrics"]["test_accuracy"] < 0.3 < manifest[-1]["metrics"]["test_accuracy"]
    assert json.loads((run / "hparams.json").read_text())["train"]["lr"] == 0.05
    # what the run wrote is what pipeline.layout declares (the rules' outputs), plus resume state
    declared = {RUN_FILES[n] for n in layout.declared(traced=True)}
    assert {p.name for p in run.iterdir()} == declared | {"checkpoints", "segments"}


def test_nan_stops_with_clear_error_or_is_recorded(tmp_path):
    with pytest.raises(TrainingDiverged, match="train.lr"):
        train_run(tmp_path / "a", hparams(lr=1e8, epochs=1), progress=False)
    summary = train_run(tmp_path / "b", hparams(lr=1e8, epochs=2, on_nan="record"), progress=False)
    assert summary["status"] == "diverged" and summary["steps"] < 168


RUNNER = """
import json, sys
from pipeline.train.loop import train_run
train_run(sys.argv[1], json.load(open(sys.argv[2])), threads=1, progress=False)
"""


def test_a_training_job_imports_no_module_it_does_not_need(tmp_path):
    """A training job's fixed cost: the digits come from scikit-learn's file, not its import; the
    optimizers (SGD, then Adam in the same process) do not import ``torch._dynamo``, the history
    is written without pandas, the neuron structure's shapes without sympy."""
    heavy = ("sklearn", "matplotlib", "pandas", "sympy", "torch._dynamo")
    for name, optimizer in (("sgd", "sgd"), ("adam", "adam")):
        (tmp_path / f"{name}.json").write_text(json.dumps(hparams(epochs=1, optimizer=optimizer)))
    probe = (
        "import json, sys\n"
        "from pipeline.train.loop import train_run\n"
        "for name in ('sgd', 'adam'):\n"
        "    hp = json.load(open(f'{sys.argv[1]}/{name}.json'))\n"
        "    train_run(f'{sys.argv[1]}/{name}', hp, threads=1, progress=False)\n"
        f"print(sorted(m for m in {heavy!r} if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "sgd" / "final.pt").is_file() and (tmp_path / "adam" / "final.pt").is_file()
    history = pd.read_parquet(tmp_path / "adam" / "history.parquet")
    assert isinstance(history.split.dtype, pd.CategoricalDtype)
    assert list(history.split.cat.categories) == ["train", "val", "test"]


def _start(run_dir, hp_file):
    return subprocess.Popen([sys.executable, "-c", RUNNER, str(run_dir), str(hp_file)])


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    hp = hparams(epochs=12)
    hp_file = tmp_path / "hp.json"
    hp_file.write_text(json.dumps(hp))
    ref, killed = tmp_path / "ref", tmp_path / "killed"
    assert _start(ref, hp_file).wait(timeout=300) == 0

    proc = _start(killed, hp_file)
    deadline = time.time() + 120
    while time.time() < deadline and len(list((killed / "checkpoints").glob("*.pt"))) < 8:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((killed / "checkpoints").glob("*.pt"))
    assert 8 <= len(done) and not (killed / "final.pt").exists(), "killed too late"
    assert _start(killed, hp_file).wait(timeout=300) == 0

    a = io.load_torch(ref / "final.pt")["model"]
    b = io.load_torch(killed / "final.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(
        pd.read_parquet(ref / "history.parquet"), pd.read_parquet(killed / "history.parquet")
    )
    import h5py

    with h5py.File(ref / "trace.h5") as f, h5py.File(killed / "trace.h5") as g:
        for key in ("g2", "u2", "colsum"):
            assert np.array_equal(f[key][()], g[key][()])
    assert io.read_json(ref / "checkpoints.json") == io.read_json(killed / "checkpoints.json")


STOPPABLE = """
import json, sys
from pipeline.train.loop import train_run

class Announce:  # tells the test which epoch starts, so it signals a run in progress
    def on_epoch_start(self, run):
        print(f"epoch {run.epoch}", flush=True)

train_run(sys.argv[1], json.load(open(sys.argv[2])), threads=1, progress=False,
          callbacks=(Announce(),))
"""

#: training setups the stop test draws from: optimizer and momentum, dropout, the mechanics trace,
#: checkpoint schedules (mid-epoch, epoch ends or neither, keep_last), and the signal
SETUPS = [
    {
        "optimizer": o,
        "momentum": m,
        "dropout": d,
        "mechanics": t,
        "every": e,
        "epoch_end": b,
        "keep_last": k,
        "signal": sig,
    }
    for o, m in (("sgd", 0.0), ("sgd", 0.9), ("adam", 0.0))
    for d in (0.0, 0.2)
    for t in (False, True)
    for e in (0, 25, 40)
    for b in (False, True)
    for k in (0, 2)
    for sig in ("SIGTERM", "SIGUSR1")
]
DRAWN = [SETUPS[i] for i in np.random.default_rng(12).choice(len(SETUPS), 2, replace=False)]


@pytest.mark.parametrize("setup", DRAWN, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_stop_signal_writes_a_checkpoint_and_resume_is_bit_identical(tmp_path, setup):
    """A running job gets the signal SLURM sends (preemption, time limit): it writes a checkpoint
    at the step it reached, exits with an error naming the signal (so Snakemake retries it), and
    the resumed run ends with exactly the uninterrupted run's weights, history, trace, manifest
    and checkpoint files."""
    hp = hparams(
        epochs=2,
        optimizer=setup["optimizer"],
        momentum=setup["momentum"],
        mechanics=setup["mechanics"],
    )
    hp["model"]["dropout"] = setup["dropout"]
    hp["checkpoints"] = {
        "every_steps": setup["every"],
        "epoch_end": setup["epoch_end"],
        "keep_last": setup["keep_last"],
    }
    ref, stopped = tmp_path / "ref", tmp_path / "stopped"
    train_run(ref, hp, progress=False)

    hp_file = tmp_path / "hp.json"
    hp_file.write_text(json.dumps(hp))
    proc = subprocess.Popen(
        [sys.executable, "-c", STOPPABLE, str(stopped), str(hp_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    for line in proc.stdout:
        if line.strip() == "epoch 1":
            proc.send_signal(getattr(signal, setup["signal"]))
            break
    _, err = proc.communicate(timeout=120)
    found = re.search(rf"TrainingStopped: stopped by {setup['signal']} at step (\d+)", err)
    assert proc.returncode == 1 and found, err
    step = int(found.group(1))
    assert 84 < step < 168 and not (stopped / "final.pt").exists()
    state = io.load_torch(stopped / "checkpoints" / f"step{step:09d}.pt")
    assert state["step"] == step and state["rng"]["torch"] is not None

    train_run(stopped, hp, progress=False)
    a = io.load_torch(ref / "final.pt")["model"]
    b = io.load_torch(stopped / "final.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pd.testing.assert_frame_equal(
        pd.read_parquet(ref / "history.parquet"), pd.read_parquet(stopped / "history.parquet")
    )
    assert io.read_json(ref / "checkpoints.json") == io.read_json(stopped / "checkpoints.json")
    names = sorted(p.name for p in (ref / "checkpoints").iterdir())
    assert names == sorted(p.name for p in (stopped / "checkpoints").iterdir())
    if setup["mechanics"]:
        import h5py

        with h5py.File(ref / "trace.h5") as f, h5py.File(stopped / "trace.h5") as g:
            for key in ("g2", "u2", "colsum"):
                assert np.array_equal(f[key][()], g[key][()])


def test_corrupt_newest_checkpoint_and_half_written_files_are_dropped_on_resume(tmp_path):
    hp = hparams(epochs=1)
    run = tmp_path / "run"
    train_run(run, hp, progress=False)
    reference = io.load_torch(run / "final.pt")["model"]
    history = pd.read_parquet(run / "history.parquet")
    for f in ("final.pt", "history.parquet", "checkpoints.json", "summary.json"):
        (run / f).unlink()
    newest = sorted((run / "checkpoints").glob("*.pt"))[-1]
    newest.write_bytes(newest.read_bytes()[:100])  # truncated
    # what a SIGKILL inside io.atomic_path leaves: hidden temporaries, some matching *.npz
    partial = [
        run / "segments" / ".000000084.npz.k1ll3d.npz",
        run / "segments" / ".000000084.npz.k1ll3d.tmp",
        run / "checkpoints" / ".step000000084.pt.k1ll3d.pt",
    ]
    for f in partial:
        f.write_bytes(b"half")
    train_run(run, hp, progress=False)
    again = io.load_torch(run / "final.pt")["model"]
    assert all(torch.equal(reference[k], again[k]) for k in reference)
    pd.testing.assert_frame_equal(history, pd.read_parquet(run / "history.parquet"))
    assert not any(f.exists() for f in partial)


def test_keep_last_checkpoints(tmp_path):
    hp = hparams(epochs=2)
    hp["checkpoints"]["keep_last"] = 2
    train_run(tmp_path / "run", hp, progress=False)
    files = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("*.pt"))
    assert files == ["step000000160.pt", "step000000168.pt"]
    assert [e["step"] for e in io.read_json(tmp_path / "run" / "checkpoints.json")] == [160, 168]
