"""Training-loop overhead: the pipeline's loop vs a bare hand-written PyTorch loop, and the cost of
the mechanics trace, on the default mechanics model (digits, MLP 32-32 with BatchNorm, float64).

Prints steps per second side by side and the ratios (target: pipeline/bare <= 1.2 without the
trace; with the trace <= 2.0).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pipeline import config as cfg
from pipeline import seeding
from pipeline.data import load
from pipeline.models import build
from pipeline.train.loop import train_run

ROOT = Path(__file__).resolve().parents[1]
EPOCHS = 30


def study(mechanics: bool) -> dict:
    base = cfg.load(ROOT / "config" / "config.yaml")["studies"]["mechanics"]
    return {
        **base,
        "sweep": {},
        "seeds": [1],
        "dataset": {"name": "digits", "val_fraction": 0.0},
        "train": {**base["train"], "epochs": EPOCHS, "mechanics": mechanics, "momentum": 0.9},
        "checkpoints": {"step0": False, "epoch_end": False},
    }


def pipeline_steps_per_second(mechanics: bool) -> float:
    run = cfg.expand_runs("bench", study(mechanics))[0]
    with tempfile.TemporaryDirectory() as tmp:
        summary = train_run(Path(tmp) / "run", run.hparams, progress=False)
    return summary["steps_per_second"]


def bare_steps_per_second() -> float:
    """The same model, data, batch, optimizer, and per-epoch test evaluation, written by hand."""
    torch.set_num_threads(1)
    run = cfg.expand_runs("bench", study(False))[0]
    h = run.hparams["train"]
    data = load("digits", "unused", 0.0, dtype=torch.float64)
    model = build(
        "mlp",
        data.input_shape,
        10,
        {k: v for k, v in run.hparams["model"].items() if k != "name"},
        1,
        torch.float64,
    )
    opt = torch.optim.SGD(model.parameters(), lr=h["lr"], momentum=0.9, weight_decay=h["wd"])
    x_all, y_all = data.train.x, data.train.y
    xt, yt = data.test.normalise(data.test.x), data.test.y
    steps, start = 0, time.perf_counter()
    for epoch in range(EPOCHS):
        order = torch.randperm(len(y_all), generator=seeding.generator(1, "order", epoch))
        for b in range(len(y_all) // h["batch_size"]):
            idx = order[b * h["batch_size"] : (b + 1) * h["batch_size"]]
            x, y = data.train.normalise(x_all[idx]), y_all[idx]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()
            steps += 1
        with torch.no_grad():
            model.eval()
            F.cross_entropy(model(xt), yt)
            model.train()
    return steps / (time.perf_counter() - start)


def main() -> None:
    best = {k: 0.0 for k in ("bare", "pipeline", "mechanics")}
    for _ in range(3):  # best of three, to see past a busy machine
        best["bare"] = max(best["bare"], bare_steps_per_second())
        best["pipeline"] = max(best["pipeline"], pipeline_steps_per_second(False))
        best["mechanics"] = max(best["mechanics"], pipeline_steps_per_second(True))
    print(f"{'loop':<28}{'steps/s':>10}{'time ratio vs bare':>22}")
    for name, label in [
        ("bare", "bare PyTorch loop"),
        ("pipeline", "pipeline (no trace)"),
        ("mechanics", "pipeline + mechanics trace"),
    ]:
        print(f"{label:<28}{best[name]:>10.0f}{best['bare'] / best[name]:>22.2f}")
    print(
        f"trace cost (pipeline+trace vs pipeline): "
        f"{best['pipeline'] / best['mechanics']:.2f}x (target <= 2.0)"
    )
    print(
        f"loop overhead (pipeline vs bare): {best['bare'] / best['pipeline']:.2f}x (target <= 1.2)"
    )


if __name__ == "__main__":
    main()
