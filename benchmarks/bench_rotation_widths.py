"""The rotation control (Godfrey et al., Sec. 4) across MLP widths and retraining budgets.

The claim (``rotation_grelu_absorbed``): a random G_ReLU map ``P diag(lambda)`` inserted after a
layer (before its ReLU) is absorbed by retraining the layers above at least as well as a random
orthogonal map: per member and layer, the mean G_ReLU penalty over the repeats <= the mean
orthogonal penalty (the paper, mCNN_k on CIFAR-10, 50 epochs: 0 / 1.7 / 1.3 against
0.7 / 4.6 / 8.3 points). The mechanism is information: ``ReLU(P D z) = P D ReLU(z)`` keeps
everything the frozen layers computed, ``ReLU(Q z)`` keeps a different half-space of each
rotated coordinate. Whether that loss costs accuracy depends on whether the layer is a
bottleneck for the task, so the comparison is made across widths.

For each ``--widths`` this trains a zoo of ``--seeds`` digits MLPs exactly as the embedded
default's modelsym zoos (vectorised, Adam lr 3e-3, batch 32, 15 epochs, the best validation
epoch kept), then for each ``--epochs`` runs the workflow's rotation control
(:func:`pipeline.modelsym.study.rotation_table`: ``--repeats`` maps per group, layer and
member, everything above retrained by Adam lr 3e-3, the validation-best state scored on the
test split) and evaluates the workflow's claim function on the table. Printed per (widths,
epochs): the mean penalty per layer and group over members and repeats (points), how many
member-layer checks hold, the smallest margin (orthogonal minus G_ReLU mean, points) and CPU
seconds. Minutes per row on one CPU thread; not part of CI.

    .venv/bin/python benchmarks/bench_rotation_widths.py [--widths 4-4 8-8 16-16 32-32]
        [--epochs 30 50] [--seeds 8] [--first-seed 0] [--repeats 4]

Measured 2026-11-30 (a loaded 2-core machine, seeds 0-7, 4 repeats; fc1/fc2 = the first and
second hidden layer):

    widths   epochs  grelu / orthogonal per layer (points)               checks  min margin
    4-4          30  fc1   7.9/18.3  fc2   7.3/16.7                  15/16  -3.0
    4-4          50  fc1   2.1/12.5  fc2   1.9/11.4                  15/16  -1.3
    8-8          30  fc1   8.0/16.5  fc2    4.9/9.9                  15/16  -0.3
    8-8          50  fc1   3.7/13.5  fc2    2.1/7.4                  16/16  +1.6
    16-16        30  fc1    1.8/4.5  fc2    1.5/3.8                  16/16  +0.7
    16-16        50  fc1    0.8/3.2  fc2    0.9/2.6                  16/16  +0.5
    32-32        30  fc1    0.1/0.8  fc2    0.7/0.6                  10/16  -0.7
    32-32        50  fc1   -0.2/0.4  fc2    0.1/0.2                   9/16  -0.5
    8-8-8        30  fc1   3.7/12.2  fc2    2.6/7.0  fc3 3.1/9.1     23/24  -0.7
    8-8-8        50  fc1   1.0/10.2  fc2    0.6/4.7  fc3 1.2/5.9     24/24  +0.5

The default runs 8-8 at 50 epochs (``mlp8`` zoo, seeds 0 and 1): CPU seconds per row ~80 (30
epochs) and ~120 (50), 8 members.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import pandas as pd
import torch

from pipeline.claims.check import Context, margins
from pipeline.claims.modelsym import rotation_grelu_absorbed
from pipeline.config import resolve_hparams
from pipeline.modelsym.study import rotation_table, zoo_hparams
from pipeline.modelsym.zoo import member_path, train_zoo


def zoo_study(widths: list[int], seeds: list[int]) -> dict:
    """A modelsym study block with one zoo: the default's MLP zoo at ``widths``."""
    return {
        "kind": "modelsym",
        "dataset": {"name": "digits", "val_fraction": 0.2},
        "zoos": {
            "mlp": {
                "model": {"name": "mlp", "widths": widths},
                "seeds": seeds,
                "vectorised": True,
                "train": {"optimizer": "adam", "lr": 0.003, "batch_size": 32, "epochs": 15},
            }
        },
    }


def measure(widths: list[int], seeds: list[int], epochs: int, repeats: int, root: Path):
    """The rotation table of every member (trained once per widths under ``root``)."""
    out = root / "-".join(map(str, widths))
    if not (out / "summary.json").exists():
        hparams = resolve_hparams(zoo_hparams(zoo_study(widths, seeds), "mlp"))
        train_zoo(out, hparams, seeds)
    members = [{"zoo": "mlp", "seed": s, "member": member_path(out, s)} for s in seeds]
    options = {"groups": ["grelu", "orthogonal"], "repeats": repeats, "epochs": epochs, "lr": 3e-3}
    return rotation_table(members, options, out / f"rotation-{epochs}.parquet")


def summarise(table: pd.DataFrame) -> dict:
    """Mean penalties per layer and group (points), and the claim's checks."""
    checks = margins(
        pd.DataFrame(rotation_grelu_absorbed({"tables/rotation": table}, Context("bench", {})))
    )
    mean = table.groupby(["position", "layer", "group"], sort=True).penalty.mean().unstack()
    return {
        "layers": "  ".join(
            f"{layer} {100 * r.grelu:4.1f} / {100 * r.orthogonal:4.1f}"
            for (_, layer), r in mean.iterrows()
        ),
        "hold": f"{int(checks.holds.sum())}/{len(checks)}",
        "min_margin": 100 * float(checks.margin.min()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", nargs="+", default=["4-4", "8-8", "16-16", "32-32"])
    parser.add_argument("--epochs", nargs="+", type=int, default=[30, 50])
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--first-seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=4)
    args = parser.parse_args()
    torch.set_num_threads(1)
    seeds = list(range(args.first_seed, args.first_seed + args.seeds))
    print(f"seeds {seeds[0]}-{seeds[-1]}, {args.repeats} repeats per group, layer and member")
    print(f"{'widths':10s} {'epochs':>6s}  mean penalty, grelu / orthogonal (points)")
    with tempfile.TemporaryDirectory() as tmp:
        for widths in args.widths:
            for epochs in args.epochs:
                start = time.process_time()
                table = measure(
                    [int(w) for w in widths.split("-")], seeds, epochs, args.repeats, Path(tmp)
                )
                row = summarise(table)
                print(
                    f"{widths:10s} {epochs:6d}  {row['layers']}  checks hold {row['hold']}, "
                    f"min margin {row['min_margin']:+.1f}  ({time.process_time() - start:.0f} "
                    "CPU s)",
                    flush=True,
                )


if __name__ == "__main__":
    main()
