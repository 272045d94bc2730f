"""The model zoo of a study: K independently seeded models per architecture, and their features.

- :mod:`~pipeline.zoo.train`: same-shape models without BatchNorm trained together in one
  vectorised job (``torch.func`` over stacked parameters), checkpoints selected on validation;
- :mod:`~pipeline.zoo.members`: the member file every downstream stage reads, and checkpoint
  selection for models trained as separate runs;
- :mod:`~pipeline.zoo.layers`: the probe layers (every activation call) of any traceable model;
- :mod:`~pipeline.zoo.features`: activations at those layers on a fixed probe set, in HDF5,
  written and read in row blocks.
"""

from __future__ import annotations


def sample_pairs(seeds: list[int], count: int, seed: int = 0) -> list[tuple[int, int]]:
    """``count`` ordered pairs of distinct zoo members, as Godfrey et al. draw them: each pair is
    the first two seeds of a fresh shuffle of the zoo (seeded by ``seed``; pairs may repeat
    members, never within a pair). Torch-free: the workflow calls it while parsing."""
    import random

    from pipeline import seeding

    seeds = list(seeds)
    if len(seeds) < 2:
        raise ValueError(f"a zoo needs at least 2 members to form pairs; got {seeds}")
    rng = random.Random(seeding.derive(seed, "pairs"))
    out = []
    for _ in range(count):
        order = seeds[:]
        rng.shuffle(order)
        out.append((order[0], order[1]))
    return out
