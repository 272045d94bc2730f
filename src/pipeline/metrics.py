"""The metric registry: a cached analysis of a study's runs, one table per (study, metric).

``@register_metric("name")`` marks a function ``fn(run: RunArtifacts) -> pandas.DataFrame``
(see :mod:`pipeline.mechanics.artifacts`). The cache rule passes
``register_metric.fingerprint(name)`` (a hash of the function's source and the pipeline helpers
it calls) as a param, so editing one metric re-runs that metric's cache jobs and the figures
that read them, and nothing else.
"""

from __future__ import annotations

from pipeline.registry import Registry

register_metric = Registry("metric", "register_metric", skip=1)
