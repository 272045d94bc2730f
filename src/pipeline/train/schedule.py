"""Which optimizer steps get a checkpoint."""

from __future__ import annotations

import numpy as np

from pipeline.config import CheckpointHparams


def checkpoint_steps(c: CheckpointHparams, steps_per_epoch: int, epochs: int) -> set[int]:
    """Steps (number of updates done) at which to checkpoint: step 0, every k steps, epoch ends
    and ``log_spaced`` log-spaced steps, as configured. The last step is always included."""
    total = steps_per_epoch * epochs
    steps: set[int] = {total}
    if c.step0:
        steps.add(0)
    if c.every_steps:
        steps.update(range(c.every_steps, total + 1, c.every_steps))
    if c.epoch_end:
        steps.update(range(steps_per_epoch, total + 1, steps_per_epoch))
    if c.log_spaced and total > 0:
        steps.update(int(s) for s in np.unique(np.round(np.geomspace(1, total, c.log_spaced))))
    return steps
