"""Metric cache cost: all mechanics metrics over 1,000 checkpoints of the default model, against
the time it took to train them (target: cache < 1/10 of training).

The default mechanics model (digits, MLP 32-32 with BatchNorm, float64, heavy ball) is trained for
10,000 steps with a checkpoint every 10 steps; extraction is timed and printed separately.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from pipeline import config as cfg
from pipeline.extract import extract_run
from pipeline.mechanics.cache import cache_metric
from pipeline.train.loop import train_run

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("translation", "scale", "rescale", "gradient_norm", "performance")


def main() -> None:
    base = cfg.load(ROOT / "config" / "config.yaml")["studies"]["mechanics"]
    per_epoch = 1350 // base["train"]["batch_size"]
    epochs = -(-10_000 // per_epoch)
    study = {
        **base,
        "sweep": {},
        "train": {**base["train"], "epochs": epochs, "momentum": 0.9},
        "checkpoints": {"every_steps": 10, "epoch_end": False},
    }
    run = cfg.expand_runs("bench", study)[0]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "run"
        t0 = time.perf_counter()
        summary = train_run(root, run.hparams, progress=False)
        train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        extract_run(root, Path(tmp) / "run.h5")
        extract_s = time.perf_counter() - t0
        runs = [
            {
                "name": run.name,
                "extract": Path(tmp) / "run.h5",
                "run_dir": root,
                "trace": root / "trace.h5",
            }
        ]
        t0 = time.perf_counter()
        for metric in METRICS:
            cache_metric(
                metric, runs, Path(tmp) / f"{metric}.parquet", Path(tmp) / f"{metric}.s.parquet"
            )
        cache_s = time.perf_counter() - t0
    ckpts = summary["steps"] // 10 + 1
    print(f"steps {summary['steps']}, checkpoints {ckpts}")
    print(f"{'stage':<22}{'seconds':>10}{'ratio to training':>20}")
    for label, sec in [
        ("train (with trace)", train_s),
        ("extract", extract_s),
        (f"cache ({len(METRICS)} metrics)", cache_s),
    ]:
        print(f"{label:<22}{sec:>10.2f}{sec / train_s:>20.3f}")
    print(f"cache / training = {cache_s / train_s:.3f} (target < 0.1)")


if __name__ == "__main__":
    main()
