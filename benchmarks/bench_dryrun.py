"""Dry-run (`snakemake -n`) time of large sweeps: a synthetic sweep of about 10,000 jobs (target:
under a minute) and, when present, the paper teleportation config (480 runs).

Runs snakemake on a copy of the workflow with generated configs; prints jobs and seconds.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
SNAKEMAKE = Path(sys.executable).parent / "snakemake"


def synthetic(runs_per_axis=(10, 10, 10, 5)) -> dict:
    """A sweep of 10 x 10 x 10 x 5 = 5,000 runs: 5,000 train + 5,000 extract jobs, plus the
    cache and plot jobs of the study."""
    lrs, wds, moms, seeds = runs_per_axis
    return {
        "device": "cpu",
        "studies": {
            "sweep": {
                "kind": "train",
                "dataset": {"name": "digits"},
                "model": {"name": "mlp", "widths": [8]},
                "train": {"epochs": 1, "mechanics": True},
                "sweep": {
                    "lr": [round(0.01 * (i + 1), 4) for i in range(lrs)],
                    "wd": [round(1e-4 * i, 6) for i in range(wds)],
                    "momentum": [round(0.09 * i, 3) for i in range(moms)],
                },
                "seeds": list(range(seeds)),
                "metrics": ["translation", "rescale", "performance"],
                "figures": {"sweep_rescale": {"kind": "conservation", "metric": "rescale"}},
            }
        },
    }


def dry_run(workdir: Path, configfile: str) -> tuple[int, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [str(SNAKEMAKE), "-n", f"--configfile={configfile}"],
        cwd=workdir,
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - start
    if proc.returncode:
        raise SystemExit(proc.stdout + proc.stderr)
    total = re.search(r"^total\s+(\d+)", proc.stdout + proc.stderr, re.M)
    return int(total.group(1)) if total else -1, seconds


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wf = Path(tmp) / "wf"
        wf.mkdir()
        for name in ("Snakefile", "rules", "config", "workflow", "src"):
            src = ROOT / name
            (shutil.copytree if src.is_dir() else shutil.copy2)(src, wf / name)
        (wf / "synthetic.yaml").write_text(yaml.safe_dump(synthetic()))
        cases = [("synthetic sweep", "synthetic.yaml")]
        if (wf / "config/paper/teleportation.yaml").exists():
            cases.append(("paper teleportation", "config/paper/teleportation.yaml"))
        print(f"{'config':<24}{'jobs':>8}{'dry-run s':>12}")
        for label, configfile in cases:
            jobs, seconds = dry_run(wf, configfile)
            print(f"{label:<24}{jobs:>8}{seconds:>12.1f}")
            if label == "synthetic sweep" and seconds >= 60:
                raise SystemExit(f"the {jobs}-job dry run took {seconds:.0f} s (target < 60 s)")


if __name__ == "__main__":
    main()
