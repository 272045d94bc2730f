"""A training job's fixed cost: what a one-run job of the embedded default costs beyond training.

Each sample is a fresh Python process, as Snakemake starts one per job:
- ``import torch``: the floor every job pays;
- ``job``: import the pipeline and train the default's one-run study (``digits_teacher``) once;
- ``work``: the same training a second time in that process (warm: data cached by the OS, torch's
  lazy imports done), which is what the job is for.

The fixed cost is ``job - work``; the target is ``fixed <= import torch + 0.5 s``. Medians of
``REPEATS`` interleaved samples; peak resident memory of the job process; and which heavy modules
a training job has imported (scikit-learn and matplotlib must not be among them; ``torch._dynamo``
is imported by every ``torch.optim`` step in torch 2.x, through ``_use_grad_for_differentiable``;
pandas by pyarrow's pandas shim on the first ``pyarrow.array``, so writing the history with pyarrow
alone would not avoid it).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
HEAVY = ("sklearn", "matplotlib", "scipy", "pandas", "pyarrow", "h5py", "torch._dynamo")

TORCH = "import time; t = time.perf_counter(); import torch; print(time.perf_counter() - t)"

JOB = """
import json, resource, sys, tempfile, time
t0 = time.perf_counter()
from pipeline import config as cfg
from pipeline.runs import train
study = cfg.load(sys.argv[1])["studies"]["digits_teacher"]
run = cfg.expand_runs("digits_teacher", study)[0]
with tempfile.TemporaryDirectory() as tmp:
    train(tmp + "/a", run.hparams, threads=1, progress=False)
    t1 = time.perf_counter()
    loaded = [m for m in sys.argv[2].split(",") if m in sys.modules]
    train(tmp + "/b", run.hparams, threads=1, progress=False)
    t2 = time.perf_counter()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"job": t1 - t0, "work": t2 - t1, "rss_mb": rss, "loaded": loaded}))
"""


def sample() -> tuple[float, dict]:
    """One ``import torch`` time and one job's numbers, each in a fresh interpreter."""
    torch_s = float(subprocess.run([sys.executable, "-c", TORCH], **_run).stdout)
    config = str(ROOT / "config" / "config.yaml")
    job = json.loads(
        subprocess.run([sys.executable, "-c", JOB, config, ",".join(HEAVY)], **_run).stdout
    )
    return torch_s, job


_run = {"capture_output": True, "text": True, "check": True, "cwd": ROOT}


def main() -> None:
    torch_times, jobs = [], []
    for _ in range(REPEATS):
        torch_s, job = sample()
        torch_times.append(torch_s)
        jobs.append(job)
    imp = statistics.median(torch_times)
    job = statistics.median(j["job"] for j in jobs)
    work = statistics.median(j["work"] for j in jobs)
    fixed = statistics.median(j["job"] - j["work"] for j in jobs)
    rss = statistics.median(j["rss_mb"] for j in jobs)
    print(f"medians of {REPEATS} interleaved fresh processes (one-run job: digits_teacher)")
    print(f"{'import torch':<34}{imp:>8.2f} s")
    print(f"{'job (import pipeline + train)':<34}{job:>8.2f} s   peak RSS {rss:.0f} MB")
    print(f"{'work (the same training, warm)':<34}{work:>8.2f} s")
    print(f"{'fixed cost (job - work)':<34}{fixed:>8.2f} s")
    print(f"fixed - import torch: {fixed - imp:.2f} s (target <= 0.5 s)")
    print(f"heavy modules a training job imports: {', '.join(jobs[-1]['loaded']) or 'none'}")


if __name__ == "__main__":
    main()
