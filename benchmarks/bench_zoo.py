"""Zoo training throughput: K same-shape models as one vectorised job (torch.func over stacked
parameters) vs K sequential single-model jobs of the same code, on digits.

Prints training examples per second (all members together; per-epoch validation and test
evaluation included in both) and the ratio. Target: a zoo of 16 MLPs (widths <= 64) >= 3x the
throughput of 16 sequential runs on 2 CPU cores. Larger models are reported too: there the CPU
is busy inside each matmul/convolution already and gains little; a GPU gains a lot.

    python benchmarks/bench_zoo.py [threads] [repeats]
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

from pipeline.config import expand_runs
from pipeline.zoo.train import train_zoo

K = 16


def hparams(model: dict, epochs: int, batch_size: int) -> dict:
    study = {
        "kind": "train",
        "dataset": {"name": "digits", "val_fraction": 0.1},
        "model": model,
        "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": batch_size, "epochs": epochs},
    }
    return expand_runs("bench", study)[0].hparams


def run(h: dict, seeds: list[int], threads: int) -> tuple[float, float, float]:
    """(training examples, seconds in the training loops, wall seconds with set-up)."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        summary = train_zoo(Path(tmp), h, seeds, threads=threads)
        wall = time.perf_counter() - start
    return len(seeds) * summary["steps"] * h["train"]["batch_size"], summary["seconds"], wall


def compare(
    label: str, model: dict, epochs: int, batch_size: int, threads: int, repeats: int
) -> None:
    """Best of ``repeats`` interleaved measurements of each (other jobs share the machine)."""
    h = hparams(model, epochs, batch_size)
    vec = seq = 0.0
    for _ in range(repeats):
        examples, seconds, _ = run(h, list(range(K)), threads)
        vec = max(vec, examples / seconds)
        total_examples = total_seconds = 0.0
        for seed in range(K):
            e, s, _ = run(h, [seed], threads)
            total_examples, total_seconds = total_examples + e, total_seconds + s
        seq = max(seq, total_examples / total_seconds)
    print(
        f"{label:<34} vectorised {vec:9.0f} ex/s   sequential {seq:9.0f} ex/s   "
        f"ratio {vec / seq:5.1f}x"
    )


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    print(
        f"zoo of {K} models on digits, Adam, float32, {threads} threads, best of {repeats}; "
        "training examples/s of all members together (sequential: one member at a time; "
        "per-epoch evaluation included in both)"
    )
    run(hparams({"name": "mlp", "widths": [8]}, 1, 32), [0], threads)  # warm-up: imports, data
    compare(
        "MLP 64-64 (target >= 3x)", {"name": "mlp", "widths": [64, 64]}, 5, 32, threads, repeats
    )
    compare("MLP 32, batch 16", {"name": "mlp", "widths": [32]}, 3, 16, threads, repeats)
    compare("MLP 512-512 (larger)", {"name": "mlp", "widths": [512, 512]}, 2, 32, threads, repeats)
    compare(
        "myrtle w8, no BN (larger, conv)",
        {"name": "myrtle", "width": 8, "batch_norm": False},
        1,
        32,
        threads,
        repeats,
    )


if __name__ == "__main__":
    main()
