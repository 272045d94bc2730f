"""Class removal: a mask trained without class ``c``, compared with the all-class reference.

Confusion matrices on the test items are normalised per true class (rows: true class, columns:
predicted), ``Conf[i, j] = P(predict j | class i)``. For the mask without class ``c``,
``Delta = Conf_c - Conf_ref``. With ``drop_j = -Delta_jj / Acc_ref,j * 100`` (the relative drop
of class ``j``'s accuracy, in percent; negative when it improves):

- target drop: ``drop_c``;
- largest other drop: ``max(max_{j != c} drop_j, 0)``;
- other / target: largest other drop over target drop, in percent (the paper's "largest
  other/target": small when removing the class's weights hurts only that class).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.masks.evaluate import outputs
from pipeline.masks.views import View


def confusion(out, y, num_classes: int) -> np.ndarray:
    """Row-normalised confusion matrix ``[C, C]`` of single-head outputs (rows: true class; a
    class absent from ``y`` gets a row of NaN)."""
    pred = out.argmax(1).cpu().numpy()
    true = y.cpu().numpy()
    counts = np.zeros((num_classes, num_classes))
    np.add.at(counts, (true, pred), 1)
    totals = counts.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return counts / totals


def drops(reference: np.ndarray, masked: np.ndarray, removed: int) -> dict:
    """The drop statistics of removing class ``removed`` (see module docstring) from the two
    row-normalised confusion matrices."""
    delta = masked - reference
    with np.errstate(invalid="ignore", divide="ignore"):
        rel = -np.diag(delta) / np.diag(reference) * 100 + 0.0  # + 0.0: no negative zeros
    others = np.delete(np.arange(len(rel)), removed)
    worst = int(others[np.nanargmax(rel[others])])
    largest = max(float(rel[worst]), 0.0) + 0.0
    target = float(rel[removed])
    return {
        "removed": removed,
        "reference_accuracy": float(reference[removed, removed]),
        "masked_accuracy": float(masked[removed, removed]),
        "target_drop": target,
        "largest_other_drop": largest,
        "worst_other": worst,
        "other_over_target": largest / target * 100 if target > 0 else float("nan"),
    }


def class_removal(
    model,
    reference: dict,
    removed: dict[int, dict],
    view: View,
    num_classes: int,
    batch_size: int = 2048,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(confusion, drops)``.

    ``confusion``: long rows ``(removed, true, predicted, reference, masked, delta)``.
    ``drops``: one row of :func:`drops` per removed class.
    """
    ref = confusion(*outputs(model, reference, view, batch_size), num_classes)
    true, pred = (
        g.ravel()
        for g in np.meshgrid(np.arange(num_classes), np.arange(num_classes), indexing="ij")
    )
    conf_rows, drop_rows = [], []
    for c, mask in removed.items():
        if not 0 <= c < num_classes:
            raise ValueError(f"removed class {c} is not one of the {num_classes} classes")
        conf = confusion(*outputs(model, mask, view, batch_size), num_classes)
        conf_rows.append(
            pd.DataFrame(
                {
                    "removed": c,
                    "true": true,
                    "predicted": pred,
                    "reference": ref.ravel(),
                    "masked": conf.ravel(),
                    "delta": (conf - ref).ravel(),
                }
            )
        )
        drop_rows.append(drops(ref, conf, c))
    return pd.concat(conf_rows, ignore_index=True), pd.DataFrame(drop_rows)
