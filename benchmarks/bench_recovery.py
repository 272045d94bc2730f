"""Expand-and-Cluster benchmarks (reported, not timed tests).

1. ``family``: toy teachers with one hidden layer (2-10 inputs, 3-8 neurons, minimum angles
   between neurons drawn from 5-30 degrees; relu/tanh/sigmoid/softplus, sigmoid at gain 2;
   rho = 4, N = 10, the embedded default's student settings: Adam in float32, then the
   L-BFGS polish ``expand.polish`` in float64). The same students of every
   problem are clustered by ``rule: published`` and by ``rule: pipeline`` (the paper: 80% at
   rho = 4), into ``OUT/family_rules.parquet``, and the figures ``OUT/family.{pdf,png}``,
   ``OUT/family_widths.{pdf,png}`` for the pipeline rule; ``ablation``: by the pipeline rule
   with each of its additions switched off, on the first ``--ablation-problems``, into
   ``OUT/family_ablation.parquet``: with the first two, the ablation table;
   ``family-adam``: the same problems with the Adam students alone (no ``expand.polish``; the
   default of before) into ``OUT/family_adam.parquet``.
2. ``deep``: teachers with two and three hidden layers (tanh and sigmoid at gain 2, relu),
   every neuron nonlinear on the inputs (``--deep-nonlinearity``, default 0.25; 0: the family
   of before), the default's students (Adam in float32, the L-BFGS ``expand.polish`` in
   float64; ``--no-deep-polish``: Adam alone),
   ``--seeds`` per shape (``--deep-only relu-``: those names only), ``--deep-probes`` probe
   points (2000 by default; the students cache names the count): the rate per layer and
   overall, per rule (``--deep-rules``), into ``OUT/deep.parquet`` (``--deep-shard I K``: K
   processes share the problems, each into ``OUT/deep-IofK.parquet``). Ours refits the
   polished students between layers by their polish (``cluster.refit_as_students``);
   ``pipeline - polished_refit`` (in ``--deep-rules``) is ours with the Adam refit
   (``cluster.finetune``).
3. ``dtype``: seconds (CPU) per problem with float32 against float64 students, and the
   recovery distances each gives, on the first ``--dtype-problems`` problems of the family.
4. ``students``: N = 10 students trained by one vectorised fit against ten plain sequential
   loops (per student ``nn.Sequential`` + ``torch.optim.Adam``, warmed up, the same data, batches
   and dtype; medians of 5 interleaved runs), 1 and 2 threads: the toy size (10-16-1 tanh, 500
   points, full batch; target >= 5x) and an MNIST size (784-80-10 relu, batch 512).
5. ``speed``: clustering 20,000 11-D vectors (target < 30 s).

Every problem's rows are appended as it finishes (a killed run keeps what it had), the trained
students are cached under ``OUT/students/`` (shared by the parts, which can run as separate
processes), and the summary is printed from the tables, so ``--summary`` reprints it without
running anything. On 2 idle cores the whole run takes hours (the family about 2 CPU minutes a
problem with every rule, a deep problem about as much).

    python benchmarks/bench_recovery.py [--parts family deep dtype students speed] [--problems 24]
        [--seeds 8] [--out results/bench_recovery] [--summary]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from torch import nn

from pipeline import io, seeding
from pipeline.models.activations import make as make_activation
from pipeline.plots.recovery import recovery_family, recovery_widths
from pipeline.recovery.chain import Chain, init_stack
from pipeline.recovery.cluster import (
    ADDITIONS,
    ClusterHparams,
    cluster_layer,
    preset,
    symmetry_of,
    without,
)
from pipeline.recovery.collapse import RecoveryFailed, reconstruct
from pipeline.recovery.evaluate import compare, recovery_table
from pipeline.recovery.plan import toy_family
from pipeline.recovery.students import (
    ExpandHparams,
    FitHparams,
    FitResult,
    fit,
    polish_students,
    student_chain,
    train_students,
)
from pipeline.recovery.study import make_teacher
from pipeline.recovery.teachers import ProbeData, probe_distribution

ROOT = Path(__file__).resolve().parents[1]
ACTIVATIONS = ("relu", "tanh", "sigmoid", "softplus")
GAINS = {"sigmoid": 2.0}
# deep teachers: every neuron at least this x as nonlinear on the inputs as a unit Gaussian
# neuron (teachers.ToyTeacher.min_nonlinearity; dead, always active or near-linear neurons of
# upper layers are not identifiable); 0 draws the family of before
NONLINEAR = 0.25
DEEP_SHAPES = {"2 layers": [(6, 8), (3, 5)], "3 layers": [(6, 8), (4, 6), (3, 4)]}
# probe points per shape (``--deep-probes``). The rho = 4 students hold 600-1000 parameters with
# two hidden layers, 800-1600 with three: with 2000 points the three-layer students fit the
# probes 5-10x closer than held-out points, with 8000 within 1.5x, yet recover no more teachers
# (README, recovery section), at 2-4x the CPU
DEEP_PROBES = {"2 layers": 2000, "3 layers": 2000}


def default_study() -> dict:
    """The embedded default's recovery study: its student and cluster settings."""
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    return config["studies"]["recovery"]


def rules() -> dict[str, ClusterHparams]:
    """The published rule, ours, and ours minus each addition."""
    base = ClusterHparams.from_dict(default_study().get("cluster", {}))
    out = {"published": replace(preset("published"), gamma=base.gamma, beta=base.beta)}
    out["pipeline"] = base
    for name in ADDITIONS:
        out[f"pipeline - {name}"] = without(name, base)
    return out


def _append(path: Path, rows: pd.DataFrame) -> None:
    table = pd.concat([io.read_parquet(path), rows], ignore_index=True) if path.exists() else rows
    io.write_parquet(path, table)


def _failed(name: str, chain: Chain, students, err: Exception) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "problem": name,
                "layer": layer,
                "teacher_width": width,
                "inferred_width": 0,
                "excess": 0,
                "max_d_w": 1.0,
                "median_d_w": 1.0,
                "unique_matches": 0,
                "best_student_test": float(students.test_loss.min()),
                "reconstruction_test": float("nan"),
                "recovered": False,
                "error": str(err),
            }
            for layer, width in zip(chain.layers, chain.widths, strict=False)
        ]
    )


def students_of(name, chain, data, expand: ExpandHparams, cache: Path | None):
    """The trained students of a problem (deterministic on the CPU, so cached in ``cache``
    and shared by the runs of every part): ``(chain, result, CPU seconds of the training)``.
    The Adam stage is cached on its own and serves every polish; a polished set's file names
    its polish settings by a digest (another ``expand.polish``, another file). The cache holds
    tensors, lists and numbers only (``weights_only`` loads); the students' history is not
    kept."""
    s_chain = student_chain(chain, expand.rho)
    stem = f"{name}-n{len(data.x)}-{expand.dtype}"  # another probe count, other students
    if expand.polish is None:
        path = cache / f"{stem}.pt" if cache else None
    else:
        digest = hashlib.sha1(json.dumps(asdict(expand.polish), sort_keys=True).encode())
        tag = f"polish-{expand.polish_dtype}-{digest.hexdigest()[:8]}"
        path = cache / f"{stem}-{tag}.pt" if cache else None
    if path is not None and path.exists():
        students, seconds = _load_students(path)
        return s_chain, students, seconds
    if expand.polish is not None:  # as train_students does: the fit, then its polish
        _, students, seconds = students_of(name, chain, data, replace(expand, polish=None), cache)
        t0 = time.process_time()
        students = polish_students(s_chain, students, data, expand)
    else:
        t0, seconds = time.process_time(), 0.0
        s_chain, students = train_students(chain, data, expand)
    seconds += time.process_time() - t0
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        keep = ("train_loss", "test_loss", "status", "epochs")
        record = {k: getattr(students, k) for k in keep}
        torch.save({"params": students.params, **record, "seconds": seconds}, path)
    return s_chain, students, seconds


def _load_students(path: Path) -> tuple[FitResult, float]:
    raw = torch.load(path, weights_only=True)
    result = FitResult(
        raw["params"],
        raw["train_loss"],
        raw["test_loss"],
        raw["status"],
        raw["epochs"],
        pd.DataFrame(),
    )
    return result, float(raw["seconds"])


def solve(name, spec, probes, expand: ExpandHparams, variants: dict, cache=None):
    """Students of one problem, clustered by every rule in ``variants``: per rule, the
    recovery table (one row per layer) with the rule, seconds and student seconds."""
    chain, params = make_teacher(spec)
    data = probe_distribution(chain, params, probes, 1000, seed=1)
    s_chain, students, student_seconds = students_of(name, chain, data, expand, cache)
    tables = []
    for rule, h in variants.items():
        t0 = time.process_time()
        try:
            rec = reconstruct(s_chain, students, data, h, students_polish=expand.polish)
            _, layers = compare(chain, params, rec.chain, rec.params)
            table = recovery_table(
                name, layers, students.test_loss, float(rec.finetune.test_loss[0])
            ).assign(error="", clustered=len(rec.clustered))
        except RecoveryFailed as err:
            table = _failed(name, chain, students, err)
        tables.append(
            table.assign(
                rule=rule,
                activation=spec["activation"],
                min_angle=spec.get("min_angle", 0.0),
                depth=len(spec["widths"]),
                seconds=time.process_time() - t0,
                student_seconds=student_seconds,
                best_student_train=float(students.train_loss.min()),
            )
        )
    return pd.concat(tables, ignore_index=True)


def expand_settings(dtype: str | None = None, polish: bool = True) -> ExpandHparams:
    """The embedded default's students (``dtype``: in that dtype; ``polish=False``: without
    ``expand.polish``, Adam's alone)."""
    h = ExpandHparams.from_dict(default_study()["expand"])
    h = replace(h, dtype=dtype) if dtype else h
    return h if polish else replace(h, polish=None)


def deep_expand() -> ExpandHparams:
    """The deep family's students: the default's (none of its polish with ``--no-deep-polish``,
    the students of before)."""
    return expand_settings(polish=DEEP_POLISHED)


DEEP_POLISHED = True


def toy_problems(count: int) -> dict:
    """The one-hidden-layer toy family every toy benchmark part draws (minimum teacher angles
    5-30 degrees)."""
    return toy_family(
        count,
        seed=0,
        activations=ACTIVATIONS,
        min_angles=(5.0, 30.0),
        min_outgoing=0.3,
        gains=GAINS,
    )


def solved_problems(path: Path) -> set:
    """The problems a part's table already holds (a killed benchmark resumes after them)."""
    return set(io.read_parquet(path).problem) if path.exists() else set()


def family(
    count: int, out: Path, chosen: list[str], table: str = "family_rules", polish: bool = True
) -> None:
    """``polish``: the default's students (``expand.polish``); ``False``: Adam's alone."""
    path = out / f"{table}.parquet"
    done = solved_problems(path)
    variants = {k: v for k, v in rules().items() if k in chosen}
    expand = expand_settings(polish=polish)
    for name, spec in toy_problems(count).items():
        if name in done:
            continue
        table = solve(name, spec, 1000, expand, variants, out / "students")
        _append(path, table)
        mine = table[table.rule == "pipeline"].iloc[0] if "pipeline" in variants else table.iloc[0]
        print(
            f"  {name:26s} width {mine.teacher_width} -> {mine.inferred_width}  max d_w "
            f"{mine.max_d_w:.1e}  held-out {mine.reconstruction_test:.1e} (best student "
            f"{mine.best_student_test:.1e})  "
            + " ".join(
                f"{r}:{'ok' if ok else 'x'}"
                for r, ok in table.groupby("rule").recovered.all().items()
            ),
            flush=True,
        )


def deep_family(seeds: int) -> dict[str, tuple[str, dict]]:
    """``name -> (shape, teacher)``: ``seeds`` teachers per shape and activation, taken in
    turn (every shape and activation has some before any has all)."""
    groups = []
    for shape, ranges in DEEP_SHAPES.items():
        for act in ("tanh", "sigmoid", "relu"):
            problems = toy_family(
                seeds,
                seed=len(ranges),
                activations=(act,),
                input_dims=(6, 10),
                widths=ranges,
                gains={"tanh": 2.0, "sigmoid": 4.0, "relu": 2.0},
                min_angle=30.0,
                min_outgoing=0.5,
                min_nonlinearity=NONLINEAR,
            )
            tag = f"-nl{NONLINEAR:g}" if NONLINEAR else ""  # other teachers, other names
            groups.append([(name + tag, (shape, spec)) for name, spec in problems.items()])
    return dict(item for turn in zip(*groups, strict=True) for item in turn)


def deep(
    seeds: int, out: Path, chosen: list[str], only: list[str] | None = None, shard=(0, 1)
) -> None:
    """``only``: the problems whose names start with one of these (e.g. ``relu-``); ``shard``
    ``(i, k)``: every k-th of the wanted problems from the i-th, into
    ``OUT/deep-<i>of<k>.parquet`` (k processes share them; the students cache is shared, one
    file per problem)."""
    index, shards = shard
    path = out / ("deep.parquet" if shards == 1 else f"deep-{index}of{shards}.parquet")
    done = set().union(*(_deep_solved(p) for p in out.glob("deep*.parquet")))
    variants = {k: v for k, v in rules().items() if k in chosen}
    wanted = {
        name: item
        for name, item in deep_family(seeds).items()
        if not only or name.startswith(tuple(only))
    }
    for position, (name, (shape, spec)) in enumerate(wanted.items()):
        probes = DEEP_PROBES[shape]
        if (name, probes) in done or position % shards != index:
            continue
        table = solve(name, spec, probes, deep_expand(), variants, out / "students")
        table = table.assign(shape=shape, probes=probes)
        _append(path, table)
        for rule, rows in table.groupby("rule", sort=False):
            widths = ", ".join(f"{r.teacher_width}->{r.inferred_width}" for r in rows.itertuples())
            print(
                f"  {name:26s} {rule:12s} widths {widths}  max d_w "
                + ", ".join(f"{d:.0e}" for d in rows.max_d_w)
                + f"  {'recovered' if rows.recovered.all() else 'NOT recovered'}"
                f"  {rows.seconds.iloc[0] + rows.student_seconds.iloc[0]:.0f}s",
                flush=True,
            )


def _probes(table: pd.DataFrame) -> pd.Series:
    """The probe points of each row of a deep table (rows of before the count was recorded:
    2000, the count they were run at)."""
    probes = table["probes"] if "probes" in table else pd.Series(2000, index=table.index)
    return probes.fillna(2000).astype(int)


def _deep_solved(path: Path) -> set:
    """``(problem, probe points)`` of the rows of a deep table."""
    table = io.read_parquet(path)
    return set(zip(table.problem, _probes(table), strict=True))


def dtypes(count: int, out: Path) -> None:
    """CPU seconds per problem (students, then reconstruction) with float32 and float64
    students, interleaved, and the distances each gives."""
    path = out / "dtype.parquet"
    done = solved_problems(path)
    for name, spec in toy_problems(count).items():
        if name in done:
            continue
        rows = []
        for dtype in ("float32", "float64"):
            table = solve(
                name, spec, 1000, expand_settings(dtype), {"pipeline": rules()["pipeline"]}
            )
            rows.append(table.assign(dtype=dtype))
        table = pd.concat(rows, ignore_index=True)
        _append(path, table)
        print(
            f"  {name:26s} "
            + "  ".join(
                f"{r.dtype}: students {r.student_seconds:.1f}s + clustering {r.seconds:.1f}s, "
                f"max d_w {r.max_d_w:.0e} {'ok' if r.recovered else 'x'}"
                for r in table.itertuples()
            ),
            flush=True,
        )


def summary(out: Path) -> None:
    path = out / "family_rules.parquet"
    if path.exists():
        table = io.read_parquet(path)
        ablation = out / "family_ablation.parquet"
        if ablation.exists():  # the same students, the other rules (maybe on fewer problems)
            table = pd.concat([table, io.read_parquet(ablation)], ignore_index=True)
        per = table.groupby(["rule", "problem"], sort=False).recovered.all().reset_index()
        rate = per.groupby("rule", sort=False).recovered.agg(["mean", "sum", "count"])
        base = rate.loc["pipeline", "mean"] if "pipeline" in rate.index else float("nan")
        print(f"\nablation over the toy family ({rate['count'].max()} problems, same students):")
        print(f"  {'rule':34s} {'recovered':>10s} {'rate':>6s} {'vs pipeline':>12s}")
        for rule, r in rate.iterrows():
            print(
                f"  {rule:34s} {int(r['sum']):4d}/{int(r['count']):<5d} {r['mean']:6.0%} "
                f"{r['mean'] - base:+12.0%}"
            )
        mine = per[per.rule == "pipeline"].merge(table[["problem", "activation", "min_angle"]])
        if len(mine):
            mine = mine.drop_duplicates("problem")
            by_act = mine.groupby("activation").recovered.mean()
            print(
                "  pipeline rule by activation: "
                + ", ".join(f"{a} {r:.0%}" for a, r in by_act.items())
            )
            bins = pd.cut(mine.min_angle, [0, 10, 15, 20, 30])
            by_angle = mine.groupby(bins, observed=True).recovered.mean()
            print("  by minimum angle: " + ", ".join(f"{b} {r:.0%}" for b, r in by_angle.items()))
        pipeline = table[table.rule == "pipeline"]
        if len(pipeline):
            recovery_family({"table": pipeline}, {}, out / "family.pdf", out / "family.png")
            recovery_widths(
                {"table": pipeline}, {}, out / "family_widths.pdf", out / "family_widths.png"
            )
            for r in pipeline[~pipeline.recovered].itertuples():
                print(
                    f"  pipeline failure {r.problem}: width {r.teacher_width} -> "
                    f"{r.inferred_width}, max d_w {r.max_d_w:.1e} {r.error}"
                )
    path = out / "family_adam.parquet"
    if path.exists():
        table = io.read_parquet(path)
        per = table.groupby(["rule", "problem"], sort=False).recovered.all().reset_index()
        print(f"\ntoy family, Adam students alone ({per.problem.nunique()} problems):")
        for rule, rows in per.groupby("rule", sort=False):
            acts = rows.merge(table[["problem", "activation"]].drop_duplicates("problem"))
            by_act = acts.groupby("activation").recovered.agg(["sum", "count"])
            print(
                f"  {rule:10s} {int(rows.recovered.sum())}/{len(rows)} "
                f"({rows.recovered.mean():.0%}): "
                + ", ".join(f"{a} {int(r['sum'])}/{int(r['count'])}" for a, r in by_act.iterrows())
            )
        mine = table[(table.rule == "pipeline") & ~table.recovered]
        for r in mine.itertuples():
            print(
                f"  pipeline failure {r.problem}: width {r.teacher_width} -> "
                f"{r.inferred_width}, max d_w {r.max_d_w:.1e} {r.error}"
            )
    paths = sorted(out.glob("deep*.parquet"))  # one table, or one per shard
    if paths:
        table = pd.concat([io.read_parquet(p) for p in paths], ignore_index=True)
        table["probes"] = _probes(table)
        table["index"] = table.groupby(["rule", "probes", "problem"]).cumcount() + 1
        table["layer_ok"] = (table.teacher_width == table.inferred_width) & (table.max_d_w < 1e-3)
        print("\ndeep family (rate per layer, overall; n: probe points):")
        pad = max(map(len, table.rule))
        keys = ["rule", "shape", "probes", "activation"]
        for (rule, shape, n, act), rows in table.groupby(keys, sort=False):
            per_layer = rows.groupby("index").layer_ok.mean()
            overall = rows.groupby("problem").recovered.all()
            print(
                f"  {rule:{pad}s} {shape:9s} n={n:<6d} {act:8s} "
                + " ".join(f"L{i} {r:4.0%}" for i, r in per_layer.items())
                + f"  overall {overall.mean():4.0%} ({int(overall.sum())}/{len(overall)})"
            )
        for (rule, n), rows in table.groupby(["rule", "probes"], sort=False):
            overall = rows.groupby("problem").recovered.all()
            rate = f"{overall.mean():.0%} ({int(overall.sum())}/{len(overall)})"
            print(f"  {rule} (n={n}): all deep problems {rate}")
    path = out / "dtype.parquet"
    if path.exists():
        table = io.read_parquet(path).drop_duplicates(["problem", "dtype"])
        wide = {
            col: table.pivot(index="problem", columns="dtype", values=col)
            for col in ("student_seconds", "seconds", "max_d_w", "recovered")
        }
        ok = wide["recovered"].astype(bool)
        seconds, clustering = wide["student_seconds"], wide["seconds"]
        print(
            f"\nfloat32 vs float64 students ({len(ok)} problems, CPU s, medians): students "
            f"{seconds.float32.median():.1f} vs {seconds.float64.median():.1f} (float64/float32 "
            f"{(seconds.float64 / seconds.float32).median():.2f}x), clustering "
            f"{clustering.float32.median():.1f} vs {clustering.float64.median():.1f}; recovered "
            f"{int(ok.float32.sum())} vs {int(ok.float64.sum())}; worst max d_w of the "
            f"recovered {wide['max_d_w'].float32[ok.float32].max():.0e} vs "
            f"{wide['max_d_w'].float64[ok.float64].max():.0e}"
        )


def _toy_data(d_in: int, outputs: int, n: int) -> ProbeData:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=gen)
    y = torch.randn(n, outputs, generator=gen)
    return ProbeData(x, y, x[:256], y[:256])


def _sequential_students(chain: Chain, params: dict, data: ProbeData, h: FitHparams) -> None:
    """The baseline a competent user writes: per student a plain ``nn.Sequential`` and
    ``torch.optim.Adam``, the fit's data, batches (the same order) and dtype."""
    x, y, size = data.x, data.y, len(data.x)
    batch = size if h.batch_size <= 0 else min(h.batch_size, size)
    for n in range(next(iter(params.values())).shape[0]):
        layers = []
        for name in chain.layers:
            w = params[f"{name}.weight"][n]
            linear = nn.Linear(w.shape[1], w.shape[0], dtype=w.dtype)
            with torch.no_grad():
                linear.weight.copy_(w)
                linear.bias.copy_(params[f"{name}.bias"][n])
            layers += [linear, make_activation(chain.activation)]
        model = nn.Sequential(*layers[:-1])
        opt = torch.optim.Adam(model.parameters(), lr=h.lr, betas=(h.beta1, h.beta2), eps=h.eps)
        for epoch in range(h.max_epochs):
            if batch < size:
                order = torch.randperm(size, generator=seeding.generator(0, "order", "", epoch))
            for b in range(size // batch):
                if batch == size:
                    xb, yb = x, y
                else:
                    idx = order[b * batch : (b + 1) * batch]
                    xb, yb = x[idx], y[idx]
                opt.zero_grad()
                ((model(xb) - yb) ** 2).mean().backward()
                opt.step()


def students_speed(d_in, width, outputs, activation, n, batch, epochs, label, repeats=5) -> None:
    """Wall seconds per epoch of N = 10 students, one vectorised fit against ten plain
    sequential loops (both warmed up; medians of ``repeats`` interleaved runs)."""
    chain = Chain(d_in, (width,), outputs, activation)
    data = _toy_data(d_in, outputs, n)
    params = init_stack(chain, 10, seed=0, dtype=torch.float32)
    h = FitHparams(
        lr=1e-3, batch_size=batch, max_epochs=epochs, plateau_patience=10**6, log_every=10**6
    )
    warm = replace(h, max_epochs=2)
    fit(chain, params, data, warm)
    _sequential_students(chain, params, data, warm)
    times = {"vectorised": [], "sequential": []}
    for _ in range(repeats):
        t0 = time.perf_counter()
        fit(chain, params, data, h)
        times["vectorised"].append((time.perf_counter() - t0) / epochs)
        t0 = time.perf_counter()
        _sequential_students(chain, params, data, h)
        times["sequential"].append((time.perf_counter() - t0) / epochs)
    vec, seq = (float(np.median(times[k])) for k in ("vectorised", "sequential"))
    batch_name = "full batch" if batch <= 0 else f"batch {batch}"
    print(
        f"  {label:10s} ({d_in}-{width}-{outputs} {activation}, {n} points, {batch_name}): "
        f"sequential {seq * 1e3:8.2f} ms/epoch   vectorised {vec * 1e3:8.2f} ms/epoch   "
        f"speed-up {seq / vec:5.1f}x",
        flush=True,
    )


def students(threads=(1, 2)) -> None:
    for count in threads:
        torch.set_num_threads(count)
        print(f"students, N = 10, vectorised vs sequential ({count} thread(s), float32):")
        students_speed(10, 16, 1, "tanh", 500, 0, 200, "toy")
        students_speed(784, 80, 10, "relu", 4096, 512, 3, "MNIST-size")


def clustering_speed(count: int, dim: int, label: str) -> None:
    """cluster_layer on ``count`` neuron vectors of dimension ``dim`` from 10 students: each
    holds noisy, rescaled, sign-flipped copies of the same 75% of its neurons (the planted
    teacher neurons) and random vectors for the rest."""
    gen = torch.Generator().manual_seed(0)
    per_student = count // 10
    clusters = 3 * per_student // 4
    centres = torch.randn(clusters, dim, generator=gen, dtype=torch.float64)
    vectors, owner = [], []
    for _ in range(10):
        noise = 1e-3 * torch.randn(clusters, dim, generator=gen, dtype=torch.float64)
        signs = torch.randint(0, 2, (clusters, 1), generator=gen).to(torch.float64) * 2 - 1
        scale = 0.5 + torch.rand(clusters, 1, generator=gen, dtype=torch.float64)
        vectors.append(signs * scale * (centres + noise))
        vectors.append(torch.randn(per_student - clusters, dim, generator=gen, dtype=torch.float64))
        owner += [len(owner) // per_student] * per_student
    v, owner = torch.cat(vectors), np.array(owner)
    t0 = time.perf_counter()
    result = cluster_layer(
        v, owner, np.arange(10), symmetry_of("relu"), 10, ClusterHparams(), "bench"
    )
    seconds = time.perf_counter() - t0
    print(
        f"  {label:24s} {len(v):6d} x {dim:4d}: {seconds:6.1f} s, {len(result.members)} of "
        f"{clusters} planted neurons kept",
        flush=True,
    )


def speed() -> None:
    torch.set_num_threads(2)
    print("clustering (2 threads):")
    clustering_speed(20_000, 11, "11-D (target < 30 s)")
    clustering_speed(2_000, 785, "785-D")


def main() -> None:
    global DEEP_POLISHED, NONLINEAR
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--parts",
        nargs="+",
        default=["family", "ablation", "deep", "dtype", "students", "speed"],
        help="also: family-adam (the toy family with the Adam students alone, no polish)",
    )
    parser.add_argument("--problems", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=8)
    parser.add_argument("--dtype-problems", type=int, default=8)
    parser.add_argument(
        "--ablation-problems", type=int, default=24, help="problems for ours minus each addition"
    )
    parser.add_argument(
        "--rules", nargs="+", default=None, help="family/ablation rules (default: all)"
    )
    parser.add_argument("--deep-rules", nargs="+", default=["pipeline", "published"])
    parser.add_argument("--deep-only", nargs="+", default=None, help="deep name prefixes")
    parser.add_argument(
        "--deep-shard",
        nargs=2,
        type=int,
        default=(0, 1),
        metavar=("I", "K"),
        help="every K-th wanted deep problem from the I-th (K processes share them)",
    )
    parser.add_argument(
        "--no-deep-polish", action="store_true", help="deep students without the L-BFGS polish"
    )
    parser.add_argument(
        "--deep-nonlinearity", type=float, default=NONLINEAR, help="deep teachers' min_nonlinearity"
    )
    parser.add_argument(
        "--deep-probes",
        nargs=2,
        action="append",
        metavar=("LAYERS", "N"),
        help="probe points for the deep teachers with LAYERS hidden layers (default: "
        + ", ".join(f"{k}: {v}" for k, v in DEEP_PROBES.items())
        + ")",
    )
    parser.add_argument("--out", type=Path, default=Path("results/bench_recovery"))
    parser.add_argument("--summary", action="store_true", help="only print the tables' summary")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    DEEP_POLISHED, NONLINEAR = not args.no_deep_polish, args.deep_nonlinearity
    for layers, points in args.deep_probes or ():
        if f"{layers} layers" not in DEEP_PROBES or not points.isdigit():
            parser.error(f"--deep-probes {layers} {points}: LAYERS is 2 or 3, N a count")
        DEEP_PROBES[f"{layers} layers"] = int(points)
    if not args.summary:
        torch.set_num_threads(1)
        if "family" in args.parts:
            print(f"toy family ({args.problems} problems, 1 thread):")
            family(args.problems, args.out, args.rules or ["published", "pipeline"])
        if "family-adam" in args.parts:
            print(f"toy family, Adam students alone ({args.problems} problems, 1 thread):")
            chosen = args.rules or ["published", "pipeline"]
            family(args.problems, args.out, chosen, "family_adam", polish=False)
        if "ablation" in args.parts:
            print(f"ablation ({args.ablation_problems} problems of the family, 1 thread):")
            minus = [k for k in rules() if k.startswith("pipeline - ")]
            minus = [k for k in minus if args.rules is None or k in args.rules]
            family(args.ablation_problems, args.out, minus, "family_ablation")
        if "deep" in args.parts:
            print(f"deep family ({args.seeds} seeds per shape, 1 thread):")
            deep(args.seeds, args.out, args.deep_rules, args.deep_only, tuple(args.deep_shard))
        if "dtype" in args.parts:
            print("float32 vs float64 students (1 thread):")
            dtypes(args.dtype_problems, args.out)
        if "students" in args.parts:
            students()
        if "speed" in args.parts:
            speed()
    summary(args.out)


if __name__ == "__main__":
    main()
