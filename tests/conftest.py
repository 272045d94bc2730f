"""Shared fixtures: the repository root, and a fresh copy of the workflow for end-to-end runs."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent


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
