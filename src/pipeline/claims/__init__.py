"""Each study's paper claims, checked over its tables.

A claim is a named predicate over a study's tidy tables: a registered function
``fn(tables, context, **thresholds)`` that returns one row per check (a run or seed, and the item
checked in it: a layer, a model, a removed class) with the measured ``value``, the ``threshold``
and the ``direction`` (``<``, ``<=``, ``>``, ``>=``) in which the value must lie. The thresholds
are the function's keyword defaults (the paper's numbers, stated in the claim's docstring).
:mod:`pipeline.claims.check` adds the margin (how far inside the threshold the value lies,
positive when the claim holds) and aggregates the checks per run and per claim. Claims read
tables only, never models or checkpoints, and never fail the workflow: a claim that does not
hold is a row with ``holds`` false.

``@register_claim(name, tables=(...), figure=kind)``: ``tables`` are the keys of the tables the
claim reads (a table's path under ``results/<study>/`` without ``.parquet``, e.g.
``tables/stitching`` or ``cache/scale.summary``); a claim applies to a study that has all of them.
``figure`` is the figure kind whose figures show the claim.
"""

from __future__ import annotations

from pipeline.registry import Registry

#: claims: ``fn(tables: Tables, context: Context, **thresholds) -> rows``
register_claim = Registry("claim", "register_claim", ("claims",), skip=2)
