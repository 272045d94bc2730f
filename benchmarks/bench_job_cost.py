"""A job's fixed cost: what a job of the embedded default costs beyond its work.

Each sample is a fresh Python process, as Snakemake starts one per job:
- ``import torch``: the floor every job pays;
- ``job``: import the pipeline and do the job's work once, as its script does (from what the rule
  passes: the run's non-default hyperparameters, the code fingerprint its summary records);
- ``work``: the same work a second time in that process (warm: data cached by the OS, lazy
  imports done), which is what the job is for.

The fixed cost is ``job - work``; the target for a training job is ``fixed <= import torch +
0.5 s``. Jobs measured: a one-run training job (``digits_teacher``), a plot job (the mechanics
study's ``performance`` figure, from a table made once from a trained run) and a vectorised zoo
job (the modelsym MLP zoo, 1 epoch). Medians of ``REPEATS`` interleaved samples, wall and CPU
(user + sys) seconds; peak resident memory of the job process; and which heavy modules the job
has imported (a training job imports none of scikit-learn, matplotlib, pandas, sympy and
``torch._dynamo``: :mod:`pipeline.train.optim` says how its optimizers avoid the last).

Not counted: Snakemake's own preamble in every script job (``import snakemake.script`` and the
unpickling of its ``snakemake`` object), printed on its own line.

    python benchmarks/bench_job_cost.py [REPEATS]
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
HEAVY = ("sklearn", "matplotlib", "scipy", "pandas", "sympy", "pyarrow", "h5py", "torch._dynamo")

TORCH = """
import json, time
t, c = time.perf_counter(), time.process_time()
import torch
print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c}))
"""

PREAMBLE = """
import json, time
t, c = time.perf_counter(), time.process_time()
import snakemake.script, snakemake.logging
print(json.dumps({"wall": time.perf_counter() - t, "cpu": time.process_time() - c}))
"""

# Each job: WORK(tag) does the work into a fresh folder named by tag; ``args`` is argv[1] (JSON).
TIMED = """
import json, resource, sys, time
t0, c0 = time.perf_counter(), time.process_time()
args = json.loads(sys.argv[1])
{setup}
def work(tag):
{work}
work("a")
t1, c1 = time.perf_counter(), time.process_time()
loaded = [m for m in args["heavy"] if m in sys.modules]
work("b")
t2, c2 = time.perf_counter(), time.process_time()
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"job": t1 - t0, "work": t2 - t1, "job_cpu": c1 - c0, "work_cpu": c2 - c1,
                  "rss_mb": rss, "loaded": loaded}}))
"""

JOBS = {
    "train (digits_teacher, 1 run)": (
        "from pipeline.config import resolve_hparams\nfrom pipeline.train.extensions import train",
        "    train(f\"{args['tmp']}/train-{tag}\", resolve_hparams(args['nondefault']),"
        " code=args['code'], threads=1, progress=False)",
    ),
    "plot (mechanics performance)": (
        "from pipeline.plots import draw",
        "    draw('performance', args['table'], args['summary'], {},"
        " f\"{args['tmp']}/plot-{tag}.pdf\", f\"{args['tmp']}/plot-{tag}.png\")",
    ),
    "zoo (modelsym mlp, 1 epoch)": (
        "from pipeline.modelsym.study import train_members",
        "    train_members(f\"{args['tmp']}/zoo-{tag}\", args['zoo'], args['seeds'],"
        " code=args['zoo_code'])",
    ),
}

# Once: a trained run and its performance table, the plot job's input.
SETUP = """
import json, sys
from pipeline.config import resolve_hparams
from pipeline.mechanics.cache import cache_metric
from pipeline.train.extensions import train
args = json.loads(sys.argv[1])
run = f"{args['tmp']}/input-run"
train(run, resolve_hparams(args["nondefault"]), code=args["code"], threads=1, progress=False)
cache_metric("performance", [{"name": "run", "run_dir": run}], args["table"], args["summary"])
"""

_run = {"capture_output": True, "text": True, "check": True, "cwd": ROOT}


def _python(code: str, *argv: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code, *argv], **_run).stdout
    return json.loads(out.strip().splitlines()[-1]) if out.strip() else {}


def _arguments(tmp: str) -> dict:
    """What the rules pass the jobs (non-default hyperparameters, code fingerprints)."""
    from pipeline import config as cfg
    from pipeline.fingerprint import code_fingerprint
    from pipeline.modelsym import study as zoo_study
    from pipeline.registry import source_constant

    config = cfg.load(ROOT / "config" / "config.yaml")
    run = cfg.expand_runs("digits_teacher", config["studies"]["digits_teacher"])[0]
    modelsym = config["studies"]["modelsym"]
    zoo = zoo_study.zoo_hparams(modelsym, "mlp")
    zoo = {**zoo, "train": {**zoo.get("train", {}), "epochs": 1}}
    return {
        "tmp": tmp,
        "heavy": HEAVY,
        "nondefault": run.nondefault,
        "code": code_fingerprint(
            source_constant("pipeline.train.extensions", "TRAIN_CODE"), run.hparams
        ),
        "table": f"{tmp}/performance.parquet",
        "summary": f"{tmp}/performance.summary.parquet",
        "zoo": zoo,
        "seeds": modelsym["zoos"]["mlp"]["seeds"],
        "zoo_code": code_fingerprint(zoo_study.ZOO_CODE, zoo),
    }


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        args = json.dumps(_arguments(tmp))
        subprocess.run([sys.executable, "-c", SETUP, args], **_run)
        torch_s, preamble, samples = [], [], {name: [] for name in JOBS}
        for i in range(REPEATS):
            torch_s.append(_python(TORCH))
            preamble.append(_python(PREAMBLE))
            for name, (setup, work) in JOBS.items():
                per_sample = json.loads(args) | {"tmp": f"{tmp}/{i}"}
                code = TIMED.format(setup=setup, work=work)
                samples[name].append(_python(code, json.dumps(per_sample)))

    def med(values) -> float:
        return statistics.median(values)

    floor, floor_cpu = med(t["wall"] for t in torch_s), med(t["cpu"] for t in torch_s)
    print(f"medians of {REPEATS} interleaved fresh processes; seconds wall (cpu = user + sys)")
    print(f"{'import torch':<32}{floor:>7.2f} ({floor_cpu:.2f} cpu)")
    print(
        f"{'snakemake script preamble':<32}{med(p['wall'] for p in preamble):>7.2f} "
        f"({med(p['cpu'] for p in preamble):.2f} cpu)   (every script job, not counted below)"
    )
    header = f"{'job':<32}{'job':>7}{'work':>7}{'fixed':>7}{'fixed cpu':>10}  fixed - torch"
    print(header)
    for name, runs in samples.items():
        fixed = med(r["job"] - r["work"] for r in runs)
        fixed_cpu = med(r["job_cpu"] - r["work_cpu"] for r in runs)
        print(
            f"{name:<32}{med(r['job'] for r in runs):>7.2f}{med(r['work'] for r in runs):>7.2f}"
            f"{fixed:>7.2f}{fixed_cpu:>10.2f}  {fixed - floor:+.2f} s ({fixed_cpu - floor_cpu:+.2f}"
            f" cpu)   peak RSS {med(r['rss_mb'] for r in runs):.0f} MB"
        )
        print(f"{'':<32}imports: {', '.join(runs[-1]['loaded']) or 'none of ' + str(HEAVY)}")
    print("target: a training job's fixed - torch <= 0.5 s")


if __name__ == "__main__":
    main()
