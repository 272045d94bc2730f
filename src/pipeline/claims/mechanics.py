"""Neural mechanics (Kunin et al. 2021): conservation laws of SGD and heavy-ball momentum.

The metric caches' summary tables (``cache/<metric>.summary``) hold, per run, layer and
quantity, the largest deviation of the measured quantity from the exact discrete prediction and
from the continuous one, relative to the size of its terms (the table's ``magnitude``). Rows
with a ``note`` have no prediction (another optimizer, a changing learning rate) and are not
checked.
"""

from __future__ import annotations

import pandas as pd

from pipeline.claims import register_claim
from pipeline.claims.check import Context, Tables, check

LAWS = ("translation", "scale", "rescale")


def _bn_eps(context: Context, run: str) -> float | None:
    """The run's BatchNorm epsilon (the model's default where the config leaves it)."""
    model = context.runs.get(run, {}).get("model", {})
    if "bn_eps" in model:
        return float(model["bn_eps"])
    from pipeline.models import register_model

    try:
        default = register_model.entry(model.get("name", "")).defaults.get("bn_eps")
    except KeyError:
        return None
    return None if default is None else float(default)


def _predicted(tables: Tables, law: str) -> pd.DataFrame:
    summary = tables[f"cache/{law}.summary"]
    return summary[summary.note.fillna("") == ""] if len(summary) else summary


def _discrete(tables, context, law, tolerance, exact_eps):
    rows = []
    for r in _predicted(tables, law).itertuples():
        eps = _bn_eps(context, r.run)
        if law == "scale" and (eps is None or eps > exact_eps):
            continue  # BatchNorm's epsilon breaks the scale symmetry: see bn_eps_breaks_scale
        rows.append(
            check(
                r.run,
                r.layer,
                r.max_rel_dev_discrete,
                "<=",
                tolerance,
                context.runs.get(r.run, {}).get("seed"),
            )
        )
    figure = context.figures("conservation", metric=law)
    return pd.DataFrame(rows).assign(figure=", ".join(figure)) if rows else []


@register_claim("translation_discrete", tables=("cache/translation.summary",))
def translation_discrete(tables: Tables, context: Context, tolerance: float = 1e-6):
    """The exact discrete translation law (softmax logit column sums) holds to 1e-6, relative.

    Every run with a prediction, every logit layer: max |empirical - discrete| / magnitude."""
    return _discrete(tables, context, "translation", tolerance, 0.0)


@register_claim("scale_discrete", tables=("cache/scale.summary",))
def scale_discrete(
    tables: Tables, context: Context, tolerance: float = 1e-6, exact_eps: float = 1e-9
):
    """The exact discrete scale law (BatchNorm-normalised layers) holds to 1e-6, relative,
    where BatchNorm's epsilon is negligible (bn_eps <= 1e-9)."""
    return _discrete(tables, context, "scale", tolerance, exact_eps)


@register_claim("rescale_discrete", tables=("cache/rescale.summary",))
def rescale_discrete(tables: Tables, context: Context, tolerance: float = 1e-6):
    """The exact discrete rescale law (ReLU neurons, incoming minus outgoing) holds to 1e-6,
    relative."""
    return _discrete(tables, context, "rescale", tolerance, 0.0)


@register_claim(
    "continuous_sgd",
    tables=("cache/translation.summary", "cache/scale.summary", "cache/rescale.summary"),
)
def continuous_sgd(
    tables: Tables, context: Context, tolerance: float = 1e-3, exact_eps: float = 1e-9
):
    """The continuous (gradient-flow) predictions hold to 1e-3, relative, for plain SGD.

    Runs without momentum; the scale law where bn_eps <= 1e-9."""
    rows = []
    for law in LAWS:
        for r in _predicted(tables, law).itertuples():
            hp = context.runs.get(r.run, {})
            if hp.get("train", {}).get("momentum", 0.0) != 0:
                continue
            eps = _bn_eps(context, r.run)
            if law == "scale" and (eps is None or eps > exact_eps):
                continue
            rows.append(
                check(
                    r.run,
                    f"{law} {r.layer}",
                    r.max_rel_dev_continuous,
                    "<=",
                    tolerance,
                    hp.get("seed"),
                )
            )
    return rows


@register_claim("bn_eps_breaks_scale", tables=("cache/scale.summary",), figure="conservation")
def bn_eps_breaks_scale(
    tables: Tables, context: Context, factor: float = 100.0, exact_eps: float = 1e-9
):
    """BatchNorm's epsilon breaks the scale law: with bn_eps 1e-5 the discrete deviation is at
    least 100x that of bn_eps 1e-12.

    Runs that differ only in bn_eps are paired (the largest eps against the smallest, <= 1e-9);
    value: the ratio of their largest deviations over the BatchNorm layers."""
    summary = _predicted(tables, "scale")
    if summary.empty:
        return []
    worst = summary.groupby("run").max_rel_dev_discrete.max()
    eps = {run: _bn_eps(context, run) for run in worst.index}

    def others(run):  # the run name without its bn_eps component
        return "/".join(p for p in run.split("/") if not p.startswith("bn_eps~"))

    rows = []
    groups: dict[str, list[str]] = {}
    for run in worst.index:
        if eps[run] is not None:
            groups.setdefault(others(run), []).append(run)
    for runs in groups.values():
        exact = [r for r in runs if eps[r] <= exact_eps]
        broken = [r for r in runs if eps[r] > exact_eps]
        if not exact or not broken:
            continue
        lo = min(exact, key=lambda r: eps[r])
        hi = max(broken, key=lambda r: eps[r])
        ratio = worst[hi] / worst[lo] if worst[lo] > 0 else float("inf")
        rows.append(
            check(
                hi,
                f"eps {eps[hi]:g} vs {eps[lo]:g}",
                ratio,
                ">=",
                factor,
                context.runs.get(hi, {}).get("seed"),
            )
        )
    figure = context.figures("conservation", metric="scale")
    return pd.DataFrame(rows).assign(figure=", ".join(figure)) if rows else []
