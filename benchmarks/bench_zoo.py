"""Zoo training throughput: K same-shape models as one vectorised job (torch.func over stacked
parameters, ``train_zoo``) against K plain PyTorch training loops, one per member, on digits.

The baseline is what a competent user writes: per member an ``nn.Module`` from the same
builder and seed, ``torch.optim.Adam``, the same data resident as tensors, the same batch size,
the same number of steps (shuffled minibatches of the training split), and after every epoch
the same evaluation on the validation and test splits with the best-validation weights kept.
Both sides are warmed up (imports, first optimizer step) before timing; the vectorised side's
time is ``train_zoo``'s own loop time (epochs, evaluation, resume state), the baseline's its
epoch loops. Prints training examples per second of all members together and the ratio;
medians of ``repeats`` interleaved rounds. Target: a zoo of 16 MLPs (widths <= 64) >= 3x the
plain loops on 2 CPU cores. Larger models are reported too: there the CPU is busy inside each
matmul/convolution already and gains little; a GPU gains a lot.

    python benchmarks/bench_zoo.py [threads] [repeats]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline.config import expand_runs
from pipeline.data import load as load_data
from pipeline.models import build
from pipeline.modelsym.zoo import train_zoo

K = 16


def hparams(model: dict, epochs: int, batch_size: int) -> dict:
    study = {
        "kind": "train",
        "dataset": {"name": "digits", "val_fraction": 0.1},
        "model": model,
        "train": {"optimizer": "adam", "lr": 1e-3, "batch_size": batch_size, "epochs": epochs},
    }
    return expand_runs("bench", study)[0].hparams


def vectorised(h: dict, threads: int) -> float:
    """Training examples per second of ``train_zoo`` over K members."""
    with tempfile.TemporaryDirectory() as tmp:
        summary = train_zoo(Path(tmp), h, list(range(K)), threads=threads)
    return K * summary["steps"] * h["train"]["batch_size"] / summary["seconds"]


@torch.no_grad()
def accuracy(model, split, batch_size: int) -> float:
    correct = sum((model(x).argmax(1) == y).sum().item() for x, y in split.eval_batches(batch_size))
    return correct / len(split)


def plain_loop(h: dict, data, seed: int, epochs: int) -> tuple[int, float]:
    """One member as a plain loop: (training examples, seconds of its epoch loops)."""
    t = h["train"]
    options = {k: v for k, v in h["model"].items() if k != "name"}
    model = build(h["model"]["name"], data.input_shape, data.num_outputs, options, seed)
    opt = torch.optim.Adam(model.parameters(), lr=t["lr"])
    gen = torch.Generator().manual_seed(seed)
    train, batch, examples = data.train, t["batch_size"], 0
    best, best_acc = None, -1.0
    start = time.perf_counter()
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(train), generator=gen)
        for b in range(0, len(train), batch):
            idx = order[b : b + batch]
            loss = F.cross_entropy(model(train.normalise(train.x[idx])), train.y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            examples += batch
        model.eval()
        val = accuracy(model, data.val, 1024)
        accuracy(model, data.test, 1024)
        if val > best_acc:
            best_acc, best = val, {k: v.detach().clone() for k, v in model.state_dict().items()}
    seconds = time.perf_counter() - start
    model.load_state_dict(best)
    return examples, seconds


def sequential(h: dict, data, threads: int) -> float:
    """Training examples per second of K plain loops, one member after another."""
    torch.set_num_threads(threads)
    examples = seconds = 0.0
    for seed in range(K):
        e, s = plain_loop(h, data, seed, h["train"]["epochs"])
        examples, seconds = examples + e, seconds + s
    return examples / seconds


def compare(
    label: str, model: dict, epochs: int, batch_size: int, threads: int, repeats: int
) -> None:
    """Medians of ``repeats`` interleaved rounds (other jobs share the machine)."""
    h = hparams(model, epochs, batch_size)
    d = h["dataset"]
    data = load_data(d["name"], "data", d["val_fraction"], d.get("subset", 0))
    plain_loop(h, data, 0, 1)  # warm-up of this model's plain loop
    vec, seq = [], []
    for _ in range(repeats):
        vec.append(vectorised(h, threads))
        seq.append(sequential(h, data, threads))
    ratio = statistics.median(v / s for v, s in zip(vec, seq, strict=True))
    print(
        f"{label:34s} vectorised {statistics.median(vec):9.0f} ex/s   "
        f"plain loops {statistics.median(seq):9.0f} ex/s   ratio {ratio:5.1f}x",
        flush=True,
    )


def main():
    threads = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    repeats = int(sys.argv[2]) if len(sys.argv) > 2 else 5
    print(
        f"zoo of {K} models on digits, Adam, float32, {threads} threads, medians of {repeats} "
        "interleaved rounds; training examples/s of all members together (plain loops: one "
        "nn.Module + torch.optim loop per member, one after another; per-epoch evaluation "
        "included in both)"
    )
    vectorised(hparams({"name": "mlp", "widths": [8]}, 1, 32), threads)  # warm-up
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
