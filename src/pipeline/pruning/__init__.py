"""Lottery-ticket pruning (controls for Expand-and-Cluster; Frankle & Carbin 2019, Han et al.
2015), with OpenLTH's semantics and exact counts.

- :mod:`pipeline.train.pruning` (core): the strategies (``sparse_global``, ``fc19``, ``han``) as
  functions of weights and the current mask, masks across stacked models (students) too, and
  the levels of prune -> rewind -> retrain for any trainer;
- :mod:`~pipeline.pruning.lottery`: the trainer for ordinary pipeline runs (rewinding to step k
  or to the initialisation) and the lottery stage of the workflow.
"""
