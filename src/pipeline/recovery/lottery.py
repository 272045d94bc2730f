"""Lottery tickets of the students (the pruning control of Expand-and-Cluster).

The N stacked students go through the levels of :func:`pipeline.pruning.lottery.lottery`
together: masks ``[N, out, in]`` over every weight matrix (the output layer too where the
strategy prunes it), each student ranked on its own (``joint: false``: every student has exactly
the level's sparsity) or all together (``joint: true``, as published). ``rewind_step`` counts
epochs here; retraining after a rewind goes on from that epoch's batch order.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from pipeline import io
from pipeline.recovery.chain import Chain, init_stack
from pipeline.recovery.students import ExpandHparams, fit, student_chain
from pipeline.recovery.teachers import ProbeData
from pipeline.train.pruning import LotteryHparams, lottery, sparsity


def student_lottery(
    teacher: Chain,
    data: ProbeData,
    expand: ExpandHparams,
    h: LotteryHparams,
    out_dir=None,
    dtype=None,
) -> pd.DataFrame:
    """One row per (level, student): strategy, sparsity, train and held-out loss. With
    ``out_dir``: each level's masks and weights in ``level~{L}.pt`` and the table in
    ``lottery.parquet``."""
    chain = student_chain(teacher, expand.rho)
    params = init_stack(chain, expand.students, expand.seed, dtype or data.x.dtype)
    params = {k: v.to(data.x.device) for k, v in params.items()}
    output = f"{chain.layers[-1]}.weight"
    names = [f"{layer}.weight" for layer in chain.layers]
    if not (h.prune_output or h.strategy == "fc19"):
        names.remove(output)

    def train_level(start, mask, level, step):
        masks = {k: m.to(start[k].dtype) for k, m in mask.items()}
        keep = h.rewind_step if level == 0 else None
        result = fit(
            chain,
            start,
            data,
            expand.fit,
            expand.seed,
            masks=masks,
            tag="students",
            start_epoch=step,
            keep_epoch=keep,
        )
        return (
            result.params,
            result.kept,
            {"train_loss": result.train_loss, "test_loss": result.test_loss},
        )

    rows = []
    for level, mask, final, metrics in lottery(train_level, params, names, output, h, stacked=True):
        per_student = sparsity(mask, stacked=True)
        if out_dir is not None:
            io.save_torch(Path(out_dir) / f"level~{level}.pt", {"mask": mask, "params": final})
        for n in range(expand.students):
            rows.append(
                {
                    "strategy": h.strategy,
                    "level": level,
                    "student": n,
                    "sparsity": float(per_student[n]),
                    "train_loss": float(metrics["train_loss"][n]),
                    "test_loss": float(metrics["test_loss"][n]),
                }
            )
    table = pd.DataFrame(rows)
    if out_dir is not None:
        io.write_parquet(Path(out_dir) / "lottery.parquet", table)
    return table
