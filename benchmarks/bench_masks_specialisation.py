"""Weight-mask specialisation on addition/multiplication across network widths and dropout.

The paper's setting (Csordas et al. 2021, ``addmul_ff``): a ReLU FNN *without dropout* trained
with Adam, masks for the add and mul subtasks on the frozen network, and the inverse-mask test
with every layer inverted (``inv_mask_exclude_io: none``). For each (widths, dropout) this trains
the network as the pipeline does, trains the masks (``verify``, ``add``, ``mul``, ``add`` and
``mul`` on a second data order), runs the masks analysis, and prints the paper's specialisation
claims side by side (the same claim functions as the workflow's claims table):

- ``add->add / add->mul``: the accuracy drop on addition over that on multiplication when the
  add mask's weights are removed (claim: >= 3), and the same for mul;
- ``IoU add/mul`` against ``IoU same op``: hidden-layer IoU of the add and mul masks against the
  smallest IoU of two masks of one operation on different data orders (claim: below).

    .venv/bin/python benchmarks/bench_masks_specialisation.py [--widths 64-64 400-400-200]
        [--dropout 0 0.1] [--epochs 25] [--mask-steps 300] [--io invert]

Minutes per row on one CPU thread; not part of CI. Measured (25 epochs, 300 mask steps, seed 1,
io invert; a loaded machine, so seconds are not comparable):

    widths  dropout  acc add  acc mul  add->add/mul  mul->mul/add  IoU add/mul  IoU same op
    384-384    0.00    1.000    1.000         1.019         1.004        0.237        0.744  FAIL

Without dropout the add/mul masks still overlap less than two masks of one operation, but
removing either mask breaks both operations: at this width and mask budget the inverse-mask
claim does not hold (the default trains with dropout 0.1 and leaves the input/output layers
whole, where it holds).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from pipeline.claims.check import evaluate_study
from pipeline.config import expand_runs
from pipeline.masks.study import TABLES, analyse, train_stages
from pipeline.runs import train

STAGES = {
    "verify": {"subtask": "all"},
    "add": {"subtask": "add"},
    "mul": {"subtask": "mul"},
    "add_order2": {"subtask": "add", "seed": 2},
    "mul_order2": {"subtask": "mul", "seed": 2},
}


def study(widths, dropout, args) -> dict:
    """A ``modules_addmul`` study block as the workflow's config writes it."""
    return {
        "kind": "train",
        "dataset": {"name": "addmul", "val_fraction": 0.0},
        "model": {"name": "mlp", "widths": widths, "dropout": dropout},
        "train": {
            "optimizer": "adam",
            "lr": args.lr,
            "batch_size": args.batch_size,
            "epochs": args.epochs,
        },
        "checkpoints": {"step0": False, "epoch_end": False},
        "seeds": [args.seed],
        "masks": {
            "hparams": {
                "steps": args.mask_steps,
                "lr": args.mask_lr,
                "alpha": args.alpha,
                "samples": 4,
                "batch_size": 128,
            },
            "stages": STAGES,
            "reference": "verify",
            "evaluate_on": ["add", "mul"],
            "inverse": {"masks": ["add", "mul"], "io": args.io},
            "overlap": [["add", "mul"], ["add", "add_order2"], ["mul", "mul_order2"]],
        },
    }


def measure(widths, dropout, args, root: Path) -> dict:
    spec = study(widths, dropout, args)
    run = expand_runs("bench", spec)[0]
    run_dir = root / "run"
    start = time.perf_counter()
    train(run_dir, run.hparams, progress=False)
    files = train_stages(run_dir, spec["masks"], root / "stages")
    tables = analyse(run_dir, files, spec["masks"], root / "tables", run=run.name)
    paths = {f"masks/tables/{t}": root / "tables" / f"{t}.parquet" for t in TABLES}
    claims = evaluate_study("bench", spec, paths, {run.name: {"seed": run.seed}})
    checks = claims[claims.scope == "check"].set_index(["claim", "item"]).value
    acc = tables["accuracy"].set_index(["mask", "view"]).accuracy
    overlap = tables["overlap"]
    hidden = overlap[(overlap.kind == "role") & (overlap.layer == "hidden")]
    iou = {(r.a, r.b): r.iou for r in hidden.itertuples()}
    return {
        "acc add": acc["none", "add"],
        "acc mul": acc["none", "mul"],
        "add->add/mul": checks["inverse_mask_specialises", "remove add: add vs mul"],
        "mul->mul/add": checks["inverse_mask_specialises", "remove mul: mul vs add"],
        "IoU add/mul": iou["add", "mul"],
        "IoU same op": min(iou["add", "add_order2"], iou["mul", "mul_order2"]),
        "holds": bool(claims[claims.scope == "claim"].holds.all()),
        "seconds": time.perf_counter() - start,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--widths", nargs="+", default=["64-64", "128-128-64", "400-400-200"])
    p.add_argument("--dropout", nargs="+", type=float, default=[0.0, 0.1])
    p.add_argument("--epochs", type=int, default=25)
    p.add_argument("--lr", type=float, default=0.003)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--mask-steps", type=int, default=300)
    p.add_argument("--mask-lr", type=float, default=0.03)
    p.add_argument("--alpha", type=float, default=0.003)
    p.add_argument("--io", default="invert", help="inverse policy of the input/output layers")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    columns = ["acc add", "acc mul", "add->add/mul", "mul->mul/add", "IoU add/mul", "IoU same op"]
    print(f"{'widths':<14} {'dropout':>7} " + " ".join(f"{c:>12}" for c in columns) + "  claims")
    for w in args.widths:
        widths = [int(x) for x in w.split("-")]
        for dropout in args.dropout:
            with tempfile.TemporaryDirectory() as tmp:
                row = measure(widths, dropout, args, Path(tmp))
            cells = " ".join(f"{row[c]:>12.3f}" for c in columns)
            verdict = "hold" if row["holds"] else "FAIL"
            print(
                f"{w:<14} {dropout:>7.2f} {cells}  {verdict} ({row['seconds']:.0f} s)", flush=True
            )


if __name__ == "__main__":
    main()
