"""Model stitching (Godfrey et al. 2022, Sec. 4): how well does one network's representation at
a layer feed another's upper layers through a restricted channel map?

- :mod:`~pipeline.stitching.layers`: the stitching layer types, registered
  (``@register_stitching_layer``): linear, low_rank, lasso, birkhoff (G_ReLU), permutation,
  orthogonal; Sinkhorn normalisation and Hungarian rounding;
- :mod:`~pipeline.stitching.model`: the stitched network and its BatchNorm handling;
- :mod:`~pipeline.stitching.train`: training the stitching layer with validation selection, the
  stitching penalty table of a pair of zoo members, cross-validated options;
- :mod:`~pipeline.stitching.rotation`: the rotation/projection control.
"""

from __future__ import annotations

from pipeline.registry import Registry

#: ``@register_stitching_layer("name")`` on ``fn(n_in, n_out, **options) -> StitchLayer``; here
#: (torch-free) so the workflow can list the names and fingerprints while it parses.
register_stitching_layer = Registry(
    "stitching layer", "register_stitching_layer", ("stitching",), skip=2
)
