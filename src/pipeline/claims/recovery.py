"""Expand-and-Cluster (Martinelli et al. 2024): a teacher's neurons and width recovered from its
input-output behaviour; and lottery tickets (Frankle & Carbin 2019) as the pruning control."""

from __future__ import annotations

import math

from pipeline.claims import register_claim
from pipeline.claims.check import Context, Tables, check

#: lottery strategies that retrain from the pruned *trained* weights instead of rewinding
NOT_REWOUND = ("han",)


def _toy_problems(context: Context) -> list[str]:
    problems = context.spec.get("problems", {})
    return [p for p, spec in problems.items() if spec.get("teacher", {}).get("kind") == "toy"]


@register_claim(
    "teacher_neurons_recovered", tables=("tables/recovery",), figure="recovery_distances"
)
def teacher_neurons_recovered(tables: Tables, context: Context, tolerance: float = 1e-3):
    """Every neuron of a toy teacher is recovered: its nearest reconstructed neuron's input
    weights are within 1 - |cos| < 1e-3, and the inferred width is the teacher's.

    Per toy problem and hidden layer: the largest distance over the teacher's neurons (infinite
    where the layer's width is wrong or the reconstruction failed)."""
    table = tables["tables/recovery"]
    toy = _toy_problems(context)
    rows = []
    for r in table[table.problem.isin(toy)].itertuples():
        right = r.inferred_width == r.teacher_width
        note = "" if right else f"width {r.inferred_width}, teacher {r.teacher_width}"
        value = r.max_d_w if right else math.inf
        rows.append(check(r.problem, f"layer {r.layer}", value, "<", tolerance, note=note))
    return rows


@register_claim("reconstruction_generalises", tables=("tables/recovery",), figure="recovery_losses")
def reconstruction_generalises(tables: Tables, context: Context):
    """The reconstructed network's held-out error is at most the best student's.

    Per toy problem: the reconstruction's held-out loss against the smallest held-out loss of
    the students."""
    table = tables["tables/recovery"]
    toy = _toy_problems(context)
    per_problem = table[table.problem.isin(toy)].groupby("problem", sort=True).first()
    return [
        check(p, "held-out loss", r.reconstruction_test, "<=", r.best_student_test)
        for p, r in per_problem.iterrows()
    ]


@register_claim("lottery_ticket", tables=("tables/lottery",), figure="lottery")
def lottery_ticket(
    tables: Tables, context: Context, points: float = 0.01, min_sparsity: float = 0.5
):
    """A rewound sparse network matches the dense one: at the study's last lottery level (at
    least 50% of the weights removed) its test accuracy is within 1 point of the dense (level 0)
    network's.

    Per run and rewinding strategy (not han, which retrains the pruned trained weights): dense
    minus sparse test accuracy."""
    table = tables["tables/lottery"]
    if "test_accuracy" not in table or table.empty:
        return []
    if "run" not in table:
        table = table.assign(run="")
    rows = []
    for (run, strategy), g in table.groupby(["run", "strategy"], sort=True):
        if strategy in NOT_REWOUND:
            continue
        dense, last = g[g.level == 0], g[g.level == g.level.max()]
        if dense.empty or last.level.iloc[0] == 0 or last.sparsity.iloc[0] < min_sparsity:
            continue
        gap = dense.test_accuracy.iloc[0] - last.test_accuracy.iloc[0]
        rows.append(
            check(
                run,
                f"{strategy}, level {int(last.level.iloc[0])} "
                f"(sparsity {last.sparsity.iloc[0]:.2f})",
                gap,
                "<=",
                points,
                context.runs.get(run, {}).get("seed"),
            )
        )
    return rows
