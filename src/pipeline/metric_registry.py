"""The metric registry: a cached analysis of a study's runs, one table per (study, metric).

``@register_metric("name")`` marks a function ``fn(run: RunArtifacts) -> pandas.DataFrame``
(see :mod:`pipeline.mechanics.artifacts`). The cache rule's code fingerprint
(:mod:`pipeline.fingerprint`) reaches only the metric the job computes, so editing one metric
re-runs that metric's cache jobs and the figures that read them, and nothing else.
"""

from __future__ import annotations

from pipeline.registry import Registry

register_metric = Registry("metric", "register_metric", skip=1)
