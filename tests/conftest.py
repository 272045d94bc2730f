"""Shared fixtures: the repository root, a fresh copy of the workflow for end-to-end runs, and
the Hypothesis profiles of the property tests (``tests/test_properties_*.py``)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

# Hypothesis profiles, chosen by HYPOTHESIS_PROFILE: "ci" (default, `make test`): few small
# examples, derandomized and without an example database, so every run draws the same cases;
# "thorough" (`make test-thorough`): many larger examples, a fresh random draw each run. Both
# print the falsifying example and the blob that replays it (@reproduce_failure). The example
# counts are per property (tests/strategies.py: examples). The XLA environment runs only
# tests/test_xla.py and has no Hypothesis.
try:
    from hypothesis import HealthCheck, Phase, settings
except ImportError:  # pragma: no cover
    settings = None
if settings is not None:
    _common = dict(
        deadline=None,
        database=None,
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    # (ci: no "explain" phase, which re-runs a failing case many times to annotate it)
    settings.register_profile(
        "ci", derandomize=True, phases=[p for p in Phase if p != Phase.explain], **_common
    )
    settings.register_profile("thorough", derandomize=False, **_common)
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def copy_workflow(dest: Path) -> Path:
    """Copy the workflow (Snakefile, rules, config, scripts, src, profiles) into ``dest``."""
    dest.mkdir(parents=True)
    for name in ("Snakefile", "rules", "config", "workflow", "src", "profiles"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    return dest


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures(
    "one_thread")``): small tensors run several times faster on one thread than on two of a busy
    2-core machine, and it is the thread count every pipeline job uses (bit-identity checks of
    the trace and of resumed runs hold at a fixed count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def workflow_copy(tmp_path):
    """A fresh copy of the workflow in a temporary directory."""
    return copy_workflow(tmp_path / "wf")


def snakemake(cwd, *args, check=True, timeout=900, env=None):
    """Run the venv's snakemake in ``cwd``; return the CompletedProcess."""
    full_env = {**os.environ, **(env or {})}
    full_env["PATH"] = f"{VENV_BIN}{os.pathsep}{full_env.get('PATH', '')}"
    proc = subprocess.run(
        [str(VENV_BIN / "snakemake"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc
