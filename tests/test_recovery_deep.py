"""Expand-and-Cluster end to end on the deeper fixed-seed toy teachers (8-6-4: tanh at gain 2,
seeds 11-13, and a relu one), at the embedded default's settings (``recovery_cases``). A file
apart from ``test_recovery.py`` so the two pytest workers (``--dist loadfile``) share the deep
teachers' 1-4 CPU minutes each."""

from __future__ import annotations

import pytest
from recovery_cases import DEEP_FILE, check_recovered, marked


@pytest.mark.parametrize("name", marked(DEEP_FILE))
def test_deep_toy_teachers_are_recovered(name):
    check_recovered(name)
