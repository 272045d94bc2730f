"""The Figure 6 table: per-epoch validation accuracy of the SGD vs teleported-SGD grid.

Each run of the study is a ``train_run`` directory (``hparams.json``, ``summary.json``,
``history.parquet``) whose hyperparameters carry a ``teleport`` section (``mode``: none,
teleport, pseudo or same_distribution). Runs are labelled as in the paper: the optimizer is "SGD"
or "SGD with momentum" (momentum > 0), the method "Standard SGD", "Teleported SGD",
"Standard SGD with momentum", "Teleported SGD with momentum" (pseudo-teleported and
same-distribution runs get their own labels). A run that diverged (NaN loss) has no evaluation
after it stopped: its later epochs are rows with NaN accuracy and ``diverged`` true, so the
figure can show them as such.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline import io

PREFIX = {
    "none": "Standard",
    "teleport": "Teleported",
    "pseudo": "Pseudo-teleported",
    "same_distribution": "Same-distribution",
}
COLUMNS = (
    "run",
    "dataset",
    "model",
    "optimizer",
    "teleport",
    "method",
    "lr",
    "momentum",
    "seed",
    "epoch",
    "split",
    "accuracy",
    "loss",
    "diverged",
)


def _name_parts(run: str) -> dict[str, str]:
    return dict(p.split("~", 1) for p in run.split("/") if "~" in p)


def run_rows(run: str, root: str | Path) -> pd.DataFrame:
    """The table's rows of one run (every epoch from 1 to ``train.epochs``)."""
    root = Path(root)
    hp = io.read_json(root / "hparams.json")
    summary = io.read_json(root / "summary.json")
    history = io.read_parquet(root / "history.parquet", ("epoch", "split", "loss", "accuracy"))
    parts = _name_parts(run)
    mode = hp.get("teleport", {}).get("mode", "none")
    if mode not in PREFIX:
        raise ValueError(
            f"{root / 'hparams.json'}: teleport.mode {mode!r} not allowed; "
            f"allowed: {', '.join(PREFIX)}"
        )
    momentum = float(hp["train"].get("momentum", 0.0))
    optimizer = "SGD with momentum" if momentum > 0 else "SGD"
    evals = history[history.split.astype(str) != "train"]
    split = "val" if (evals.split.astype(str) == "val").any() else "test"
    evals = evals[evals.split.astype(str) == split].groupby("epoch")[["accuracy", "loss"]].last()
    epochs = np.arange(1, int(hp["train"]["epochs"]) + 1)
    evals = evals.reindex(epochs)
    diverged = summary.get("status") == "diverged"
    return pd.DataFrame(
        {
            "run": run,
            "dataset": hp["dataset"]["name"],
            "model": parts.get("model", hp["model"]["name"]),
            "optimizer": optimizer,
            "teleport": mode,
            "method": f"{PREFIX[mode]} {optimizer}",
            "lr": float(hp["train"]["lr"]),
            "momentum": momentum,
            "seed": int(hp["seed"]),
            "epoch": epochs,
            "split": split,
            "accuracy": evals.accuracy.to_numpy(dtype=float),
            "loss": evals.loss.to_numpy(dtype=float),
            "diverged": diverged & evals.accuracy.isna().to_numpy(),
        }
    )


def validation_table(runs: dict) -> pd.DataFrame:
    """``run name -> run directory`` to the Figure 6 table (columns :data:`COLUMNS`)."""
    frames = [run_rows(run, root) for run, root in runs.items()]
    if not frames:
        return pd.DataFrame(columns=list(COLUMNS))
    return pd.concat(frames, ignore_index=True)[list(COLUMNS)]
