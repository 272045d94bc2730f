"""Expand-and-Cluster benchmarks.

1. A family of toy teachers (2-10 inputs, 3-8 hidden neurons, relu/tanh/sigmoid, the sigmoid
   ones at gain 2; rho = 4, N = 10): the recovery rate (the paper: 80% at rho = 4) and every
   failure with its nearest distances, into ``OUT/family.parquet``,
   ``OUT/family_neurons.parquet`` and the figures ``OUT/family.{pdf,png}``,
   ``OUT/family_widths.{pdf,png}``.
2. N = 10 students trained vectorised (one program) vs sequentially (ten torch.optim.Adam runs
   of the ``mlp`` module, same data and steps), at toy size (input 10, width 32; target >= 4x
   on 2 cores) and MNIST size (input 784, width 80, 10 outputs; reported).
3. Clustering 20,000 11-D neuron vectors (distances, average linkage, cut, filters; target
   under 30 s) and 2,000 785-D vectors (reported).
4. Two-hidden-layer tanh teachers (the acceptance test's, over four seeds; not with --quick).

    python benchmarks/bench_recovery.py [--problems 12] [--quick] [--out results/bench_recovery]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import io
from pipeline.models import build
from pipeline.plots.recovery import recovery_family, recovery_widths
from pipeline.recovery.chain import Chain, init_stack, member
from pipeline.recovery.cluster import ClusterHparams, cluster_layer, symmetry_of
from pipeline.recovery.collapse import RecoveryFailed, reconstruct
from pipeline.recovery.evaluate import compare, recovery_table
from pipeline.recovery.students import ExpandHparams, FitHparams, fit, train_students
from pipeline.recovery.study import make_teacher, toy_family
from pipeline.recovery.teachers import ProbeData, probe_distribution


def family(count: int, epochs: int, out: Path) -> None:
    expand = ExpandHparams(
        students=10,
        rho=4,
        seed=0,
        fit=FitHparams(
            lr=1e-2,
            batch_size=0,
            max_epochs=epochs,
            plateau_patience=100,
            plateau_cooldown=50,
            min_lr=1e-7,
            log_every=max(epochs // 4, 1),
        ),
    )
    cluster = ClusterHparams(
        final=FitHparams(optimizer="lbfgs", lr=1.0, max_epochs=200, log_every=50)
    )
    tables, neurons = [], []
    started = time.perf_counter()
    for name, spec in toy_family(
        count, seed=0, min_angle=15.0, min_outgoing=0.3, gains={"sigmoid": 2.0}
    ).items():
        t0 = time.perf_counter()
        chain, params = make_teacher(spec)
        data = probe_distribution(chain, params, 1000, 1000, seed=1)
        s_chain, students = train_students(chain, data, expand)
        try:
            rec = reconstruct(s_chain, students, data, cluster)
            rows, layers = compare(chain, params, rec.chain, rec.params)
            table = recovery_table(
                name, layers, students.test_loss, float(rec.finetune.test_loss[0])
            )
            neurons.append(rows.assign(problem=name))
        except RecoveryFailed as err:
            table = pd.DataFrame(
                [
                    {
                        "problem": name,
                        "layer": chain.layers[0],
                        "teacher_width": chain.widths[0],
                        "inferred_width": 0,
                        "excess": 0,
                        "max_d_w": 1.0,
                        "median_d_w": 1.0,
                        "unique_matches": 0,
                        "best_student_test": float(students.test_loss.min()),
                        "reconstruction_test": float("nan"),
                        "recovered": False,
                    }
                ]
            )
            print(f"  {name}: {err}")
        table["seconds"] = time.perf_counter() - t0
        tables.append(table)
        row = table.iloc[0]
        print(
            f"  {name:22s} width {row.teacher_width} -> {row.inferred_width}  max d_w "
            f"{row.max_d_w:.1e}  held-out {row.reconstruction_test:.1e} (best student "
            f"{row.best_student_test:.1e})  {'ok' if row.recovered else 'FAILED'}  "
            f"{row.seconds:.0f}s",
            flush=True,
        )
    table = pd.concat(tables, ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    io.write_parquet(out / "family.parquet", table)
    if neurons:
        io.write_parquet(out / "family_neurons.parquet", pd.concat(neurons, ignore_index=True))
    recovery_family({"table": table}, {}, out / "family.pdf", out / "family.png")
    recovery_widths({"table": table}, {}, out / "family_widths.pdf", out / "family_widths.png")
    rate = table.groupby("problem").recovered.all().mean()
    print(
        f"family: {len(table)} problems, recovery rate {rate:.0%} (paper: 80% at rho = 4), "
        f"{time.perf_counter() - started:.0f}s; table and figures in {out}"
    )
    failures = table[~table.recovered]
    for r in failures.itertuples():
        near = ""
        if neurons:
            all_rows = pd.concat(neurons)
            mine = all_rows[(all_rows.problem == r.problem) & (all_rows.kind == "teacher")]
            near = " nearest d_w " + ", ".join(f"{d:.1e}" for d in mine.d_w)
        print(
            f"  failure {r.problem}: width {r.teacher_width} -> {r.inferred_width}, "
            f"excess {r.excess},{near}"
        )


def _toy_data(d_in: int, outputs: int, n: int) -> ProbeData:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, d_in, generator=gen)
    y = torch.randn(n, outputs, generator=gen)
    return ProbeData(x, y, x[:256], y[:256])


def students_speed(d_in, width, outputs, n, batch, epochs, label) -> None:
    """Seconds per epoch, N = 10 students: one vectorised program vs ten sequential runs."""
    chain = Chain(d_in, (width,), outputs, "relu")
    data = _toy_data(d_in, outputs, n)
    params = init_stack(chain, 10, seed=0, dtype=torch.float32)
    h = FitHparams(
        lr=1e-3, batch_size=batch, max_epochs=epochs, plateau_patience=10**6, log_every=10**6
    )
    fit(chain, params, data, FitHparams(**{**h.__dict__, "max_epochs": 1}))  # warm-up
    t0 = time.perf_counter()
    fit(chain, params, data, h)
    vectorised = (time.perf_counter() - t0) / epochs
    t0 = time.perf_counter()
    for n_student in range(10):
        model = build("mlp", (d_in,), outputs, chain.model_options(), 0, torch.float32)
        model.load_state_dict(member(params, n_student))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for epoch in range(epochs):
            order = torch.randperm(n, generator=torch.Generator().manual_seed(epoch))
            for b in range(n // batch):
                idx = order[b * batch : (b + 1) * batch]
                opt.zero_grad()
                ((model(data.x[idx]) - data.y[idx]) ** 2).mean().backward()
                opt.step()
    sequential = (time.perf_counter() - t0) / epochs
    print(
        f"  {label:10s} sequential {sequential * 1e3:8.2f} ms/epoch   vectorised "
        f"{vectorised * 1e3:8.2f} ms/epoch   speed-up {sequential / vectorised:5.1f}x",
        flush=True,
    )


def clustering_speed(count: int, dim: int, label: str) -> None:
    """cluster_layer on ``count`` neuron vectors of dimension ``dim`` from 10 students: each
    holds noisy, rescaled, sign-flipped copies of the same 75% of its neurons (the planted
    teacher neurons) and random vectors for the rest."""
    gen = torch.Generator().manual_seed(0)
    per_student = count // 10
    clusters = 3 * per_student // 4
    centres = torch.randn(clusters, dim, generator=gen, dtype=torch.float64)
    vectors, owner = [], []
    for s in range(10):
        noise = 1e-3 * torch.randn(clusters, dim, generator=gen, dtype=torch.float64)
        signs = torch.randint(0, 2, (clusters, 1), generator=gen).to(torch.float64) * 2 - 1
        scale = 0.5 + torch.rand(clusters, 1, generator=gen, dtype=torch.float64)
        vectors.append(signs * scale * (centres + noise))
        vectors.append(torch.randn(per_student - clusters, dim, generator=gen, dtype=torch.float64))
        owner += [s] * per_student
    v, owner = torch.cat(vectors), np.array(owner)
    t0 = time.perf_counter()
    result = cluster_layer(v, owner, np.arange(10), symmetry_of("relu"), 10, 0.5, 30.0, "bench")
    seconds = time.perf_counter() - t0
    print(
        f"  {label:24s} {len(v):6d} x {dim:4d}: {seconds:6.1f} s, {len(result.members)} of "
        f"{clusters} planted neurons kept",
        flush=True,
    )


def deep(epochs: int, seeds=range(1, 5)) -> None:
    """Two-hidden-layer tanh teachers (10 inputs, widths 4 and 3, gain 2; the acceptance test's
    teacher is seed 1) over several seeds: inferred widths and distances per layer."""
    recovered = 0
    for seed in seeds:
        spec = {
            "kind": "toy",
            "input_dim": 10,
            "widths": [4, 3],
            "activation": "tanh",
            "gain": 2.0,
            "min_angle": 30.0,
            "min_outgoing": 0.5,
            "seed": seed,
        }
        chain, params = make_teacher(spec)
        data = probe_distribution(chain, params, 2000, 1000, seed=1)
        t0 = time.perf_counter()
        fit_h = FitHparams(
            lr=1e-2,
            batch_size=0,
            max_epochs=epochs,
            plateau_patience=50,
            plateau_cooldown=50,
            min_lr=1e-6,
            log_every=1000,
        )
        s_chain, students = train_students(chain, data, ExpandHparams(10, 4, 0, fit_h))
        cluster = ClusterHparams(
            finetune=replace(fit_h, lr=1e-3, max_epochs=1500),
            final=FitHparams(optimizer="lbfgs", lr=1.0, max_epochs=60, log_every=10),
        )
        try:
            rec = reconstruct(s_chain, students, data, cluster)
        except RecoveryFailed as err:
            print(f"  deep teacher seed {seed}: {err}")
            continue
        rows, layers = compare(chain, params, rec.chain, rec.params)
        ok = bool(
            (layers.teacher_width == layers.inferred_width).all() and (layers.max_d_w < 1e-3).all()
        )
        recovered += ok
        widths = ", ".join(f"{r.teacher_width}->{r.inferred_width}" for r in layers.itertuples())
        print(
            f"  deep teacher seed {seed}: widths {widths}, max d_w "
            f"{', '.join(f'{d:.0e}' for d in layers.max_d_w)}, best student held-out "
            f"{float(students.test_loss.min()):.1e}, reconstruction "
            f"{float(rec.finetune.test_loss[0]):.1e}, {'recovered' if ok else 'NOT recovered'}, "
            f"{time.perf_counter() - t0:.0f}s",
            flush=True,
        )
    print(f"  deep teachers recovered: {recovered}/{len(seeds)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--problems", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3000)
    parser.add_argument("--quick", action="store_true", help="fewer problems and epochs")
    parser.add_argument("--out", type=Path, default=Path("results/bench_recovery"))
    args = parser.parse_args()
    problems, epochs = (4, 1500) if args.quick else (args.problems, args.epochs)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        print(f"students, N = 10, vectorised vs sequential ({threads} thread(s), float32):")
        students_speed(10, 32, 1, 2000, 200, 20, "toy")
        students_speed(784, 80, 10, 4096, 512, 3, "MNIST-size")
    torch.set_num_threads(2)
    print("clustering (2 threads):")
    clustering_speed(20_000, 11, "11-D (target < 30 s)")
    clustering_speed(2_000, 785, "785-D")
    torch.set_num_threads(1)
    print(f"toy family ({problems} problems, {epochs} student epochs, 1 thread):")
    family(problems, epochs, args.out)
    if not args.quick:
        print("two-hidden-layer teachers (2,000 student epochs as in the test, 1 thread):")
        deep(2_000)


if __name__ == "__main__":
    main()
