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
    """``count`` distinct pairs of zoo members, as Godfrey et al. draw them: each pair is the first
    two seeds of a fresh shuffle of the zoo (seeded by ``seed``), redrawn while it repeats an
    earlier pair in either order (a member is never paired with itself; members may recur across
    pairs). At most every pair of the zoo: ``min(count, n (n - 1) / 2)``. Torch-free: the
    workflow calls it while parsing."""
    import random

    from pipeline import seeding

    seeds = list(seeds)
    if len(seeds) < 2:
        raise ValueError(f"a zoo needs at least 2 members to form pairs; got {seeds}")
    count = min(count, len(seeds) * (len(seeds) - 1) // 2)
    rng = random.Random(seeding.derive(seed, "pairs"))
    out, seen = [], set()
    while len(out) < count:
        order = seeds[:]
        rng.shuffle(order)
        key = frozenset(order[:2])
        if key not in seen:
            seen.add(key)
            out.append((order[0], order[1]))
    return out
