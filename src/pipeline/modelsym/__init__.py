"""Model symmetries in trained networks (Godfrey et al. 2022): zoos of independently seeded
models, and how two members relate - by an element of G_ReLU (permutation and positive scaling)
or by a general map - measured by alignment, stitching and the rotation control.

The zoo:
- :mod:`~pipeline.modelsym.zoo`: same-shape models without BatchNorm trained together in one
  vectorised engine task (``torch.func`` over stacked parameters), checkpoints selected on
  validation;
- :mod:`~pipeline.modelsym.members`: the member file every downstream stage reads, and checkpoint
  selection for models trained as separate runs;
- :mod:`~pipeline.modelsym.probes`: the probe layers (every activation call) of any traceable
  model;
- :mod:`~pipeline.modelsym.features`: activations at those layers on a fixed probe set, in
  HDF5, written and read in row blocks.

Alignment (Sec. 5): :mod:`~pipeline.modelsym.similarity` (the registry of measures,
``@register_similarity``), :mod:`~pipeline.modelsym.procrustes`, :mod:`~pipeline.modelsym.cka`,
:mod:`~pipeline.modelsym.moments`, :mod:`~pipeline.modelsym.matching` (weight matching, loss
barriers, evaluation with BatchNorm re-estimation).

Stitching (Sec. 4):
- :mod:`~pipeline.modelsym.stitch_layers`: the stitching layer types, registered
  (``@register_stitching_layer``): linear, low_rank, lasso, birkhoff (G_ReLU), permutation,
  orthogonal; Sinkhorn normalisation and Hungarian rounding;
- :mod:`~pipeline.modelsym.stitched`: the stitched network and its BatchNorm handling;
- :mod:`~pipeline.modelsym.stitching`: training the stitching layer with validation selection,
  the stitching penalty table of a pair of zoo members, cross-validated options;
- :mod:`~pipeline.modelsym.rotation`: the rotation/projection control.

:mod:`~pipeline.modelsym.study` plans the study's runs and writes its tables. This module is
torch-free: the workflow reads the registries' names and :func:`sample_pairs` while it parses.
"""

from __future__ import annotations

from pipeline.registry import Registry

#: ``@register_stitching_layer("name")`` on ``fn(n_in, n_out, **options) -> StitchLayer``; here
#: (torch-free) so the workflow can list the names and fingerprints while it parses.
register_stitching_layer = Registry(
    "stitching layer", "register_stitching_layer", ("modelsym",), skip=2
)


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
