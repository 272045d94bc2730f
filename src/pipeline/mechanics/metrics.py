"""The registered mechanics metrics. Each returns a tidy table over a run's checkpoints.

Columns: run, seed, step, time (the continuous theory's: lr * step, or lr (1 - dampening) * step
under momentum), time_unit (that rule in words, for axis labels), layer, neuron, quantity,
empirical, theory_continuous, theory_discrete, magnitude (the size of the terms, to measure
deviations against: for rescale the sum of the incoming and outgoing norms, not their
difference), note (empty where a prediction applies; otherwise why none does).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline.mechanics import theory
from pipeline.mechanics.artifacts import RunArtifacts
from pipeline.metric_registry import register_metric
from pipeline.models.reductions import column_sums, part_sumsq
from pipeline.symmetry.groups import rescale_sets, scale_sets, translation_layer

COLUMNS = [
    "run",
    "seed",
    "step",
    "time",
    "time_unit",
    "layer",
    "neuron",
    "quantity",
    "empirical",
    "theory_continuous",
    "theory_discrete",
    "magnitude",
    "note",
]


def why_no_theory(run: RunArtifacts, needs_ce: bool = False) -> str:
    """Empty if the paper's predictions apply to this run; otherwise the reason, in words."""
    h = run.train
    if run.trace is None:
        return "no prediction: the run logged no per-step trace (train.mechanics: false)"
    if h.optimizer != "sgd":
        return f"no prediction for optimizer {h.optimizer} (theory covers SGD and heavy ball)"
    if h.nesterov:
        return "no prediction for Nesterov momentum (theory covers heavy ball)"
    if h.wd and h.wd_on != "all":
        return f"no prediction: weight decay acts on {h.wd_on} only (theory decays every parameter)"
    lrs = run.history.loc[run.history.split == "train", "lr"].unique()
    if len(lrs) > 1:
        return f"no prediction under a changing learning rate (schedule {h.schedule})"
    if needs_ce and h.loss != "ce":
        return f"no prediction: translation symmetry needs softmax cross-entropy, loss is {h.loss}"
    return ""


def time_unit(h) -> str:
    """How a run's time axis is measured (``theory.time_step``), for labels."""
    if h.momentum > 0 and h.dampening:
        return f"lr (1 - dampening) * step = {h.lr * (1 - h.dampening):g} * step"
    return f"lr * step = {h.lr:g} * step"


def _frame(run, quantity, layer, steps, emp, cont, disc, mag, note) -> pd.DataFrame:
    t, m = emp.shape
    h = run.train
    return pd.DataFrame(
        {
            "run": run.name,
            "seed": run.seed,
            "step": np.repeat(steps, m),
            "time": np.repeat(steps * theory.time_step(h.lr, h.momentum, h.dampening), m),
            "time_unit": time_unit(h),
            "layer": layer,
            "neuron": np.tile(np.arange(m), t),
            "quantity": quantity,
            "empirical": emp.ravel(),
            "theory_continuous": cont.ravel(),
            "theory_discrete": disc.ravel(),
            "magnitude": mag.ravel(),
            "note": note,
        }
    )


def _signed(run: RunArtifacts, s, kind: str) -> np.ndarray:
    """Per step, <x, J x> of the traced quantity ``kind``: plus part minus the minus part."""
    col = run.trace_columns(kind, s.plus.key)
    return col - run.trace_columns(kind, s.minus.key) if s.minus else col


def conservation_table(run: RunArtifacts, sets) -> pd.DataFrame:
    """Empirical Q = plus - minus at the checkpoints, with exact and continuous predictions."""
    h, steps = run.train, run.steps
    note = why_no_theory(run)
    frames = []
    for s in sets:
        halves = [s.plus] + ([s.minus] if s.minus else [])
        arrays = run.params({sl.param for p in halves for sl in p.slices})
        plus = part_sumsq(arrays, s.plus, lead=1)
        minus = part_sumsq(arrays, s.minus, lead=1) if s.minus else np.zeros_like(plus)
        emp, mag = plus - minus, plus + minus
        cont = disc = np.full_like(emp, np.nan)
        if not note:
            q0 = emp[0]
            if h.momentum == 0:
                disc = theory.discrete_sgd(q0, _signed(run, s, "g2"), h.lr, h.wd)
                cont = theory.continuous_sgd(q0, _signed(run, s, "u2"), h.lr, h.wd)
            else:
                ju = _signed(run, s, "u2")
                disc = theory.discrete_momentum(q0, ju, h.lr, h.wd, h.momentum, h.dampening)
                cont = theory.continuous_momentum(q0, ju, h.lr, h.wd, h.momentum, h.dampening)
            disc, cont = disc[steps], cont[steps]
        frames.append(_frame(run, s.symmetry, s.layer, steps, emp, cont, disc, mag, note))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def _require_start(run: RunArtifacts):
    if run.steps[0] != 0:
        raise ValueError(
            f"{run.extract_path}: the first checkpoint is step {run.steps[0]}, "
            "not 0 (mechanics needs checkpoints.step0: true)"
        )


@register_metric("scale", needs=("extract", "trace"))
def scale(run: RunArtifacts) -> pd.DataFrame:
    """Per neuron of every BatchNorm-normalised Linear/Conv: |theta_in|^2 (scale symmetry)."""
    _require_start(run)
    return conservation_table(run, scale_sets(run.structure))


@register_metric("rescale", needs=("extract", "trace"))
def rescale(run: RunArtifacts) -> pd.DataFrame:
    """Per neuron with a homogeneous activation: |theta_in|^2 - |theta_out|^2."""
    _require_start(run)
    return conservation_table(run, rescale_sets(run.structure))


@register_metric("translation", needs=("extract", "trace"))
def translation(run: RunArtifacts) -> pd.DataFrame:
    """Column sums over classes of the logit layer's [W | b] (softmax translation symmetry)."""
    _require_start(run)
    out = translation_layer(run.structure, run.train.loss) or run.structure.output
    if out is None:
        return pd.DataFrame(columns=COLUMNS)
    h, steps = run.train, run.steps
    names = [out.weight] + ([out.bias] if out.bias else [])
    arr = run.params(names)
    w, b = arr[out.weight], arr.get(out.bias)
    emp = column_sums(w, b, lead=1)
    mag = column_sums(np.abs(w), None if b is None else np.abs(b), lead=1)
    note = why_no_theory(run, needs_ce=True)
    cont = disc = np.full_like(emp, np.nan)
    if not note:
        n = int(steps.max())
        args = (emp[0], n, h.lr, h.wd, h.momentum, h.dampening)
        disc = theory.discrete_translation(*args)[steps]
        cont = theory.continuous_translation(*args)[steps]
    layer = out.weight.rsplit(".", 1)[0]
    return _frame(run, "translation", layer, steps, emp, cont, disc, mag, note)


@register_metric("gradient_norm", needs=("extract", "trace"))
def gradient_norm(run: RunArtifacts) -> pd.DataFrame:
    """Per neuron, the squared norm of the raw minibatch gradient of its incoming weights at the
    last update before each checkpoint (from the trace). Empirical only: no prediction."""
    if run.trace is None:
        raise ValueError(
            f"{run.name}: gradient_norm needs the per-step trace (train.mechanics: true)"
        )
    steps = run.steps[run.steps > 0]
    frames = []
    for key, entry in run.trace["layout"].items():
        if not key.endswith("/in"):
            continue
        emp = run.trace_columns("g2", key)[steps - 1]
        nan = np.full_like(emp, np.nan)
        frames.append(
            _frame(
                run,
                "gradient_norm",
                entry["group"],
                steps,
                emp,
                nan,
                nan,
                emp,
                "empirical only: no prediction for gradient norms",
            )
        )
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


@register_metric("performance", needs=("history",))
def performance(run: RunArtifacts) -> pd.DataFrame:
    """Loss and accuracy: per step on the training minibatches, per epoch on val/test."""
    hist = run.history
    frames = []
    for split, metric in [(s, m) for s in ("train", "val", "test") for m in ("loss", "accuracy")]:
        rows = hist[hist.split == split]
        if rows.empty:
            continue
        emp = rows[metric].to_numpy(dtype=float)[:, None]
        nan = np.full_like(emp, np.nan)
        frames.append(
            _frame(
                run,
                f"{split}_{metric}",
                "model",
                rows.step.to_numpy(),
                emp,
                nan,
                nan,
                np.abs(emp),
                "empirical only",
            )
        )
    return pd.concat(frames, ignore_index=True)
