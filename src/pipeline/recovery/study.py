"""File-to-file stages of an Expand-and-Cluster study (what the workflow's rules call).

``expand`` (the long, resumable job): teacher + probe data -> N trained students.
``cluster``: students -> reconstructed network, cluster table, neuron and recovery tables.

Teacher config (``teacher:``): ``{kind: toy, input_dim, widths, activation, outputs, weights,
gain, bias_scale, min_angle, min_outgoing, min_nonlinearity, seed}`` or ``{kind: run,
run_dir}`` (a finished pipeline run of a plain MLP; its dataset gives the input shape). Probe
config (``probe:``): ``{inputs: gaussian | uniform, n, n_test, scale, seed}`` or ``{inputs:
<dataset>, noise, subset, mask_inputs, seed}``. Everything derives from these and the seeds, so
the cluster stage rebuilds the probe data instead of storing it.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from pipeline import devices, io, seeding
from pipeline.config import from_block
from pipeline.recovery.chain import Chain
from pipeline.recovery.cluster import ClusterHparams
from pipeline.recovery.collapse import RecoveryFailed, reconstruct
from pipeline.recovery.evaluate import compare, recovery_table
from pipeline.recovery.plan import TOLERANCE
from pipeline.recovery.students import ExpandHparams, FitResult, train_students
from pipeline.recovery.teachers import (
    ProbeData,
    ToyTeacher,
    load_run_teacher,
    make_toy_teacher,
    probe_dataset,
    probe_distribution,
)


def make_teacher(spec: dict, data_dir="data", dtype=torch.float64) -> tuple[Chain, dict]:
    spec = dict(spec)
    kind = spec.pop("kind", "toy")
    if kind == "toy":
        toy = from_block(ToyTeacher, spec, "teacher")
        return make_toy_teacher(toy, dtype)
    if kind == "run":
        from pipeline.data import register_dataset

        run_dir = Path(spec["run_dir"])
        hparams = io.read_json(run_dir / "hparams.json")
        source = register_dataset.get(hparams["dataset"]["name"])(Path(data_dir))
        return load_run_teacher(
            run_dir, source.input_shape, source.num_classes * source.heads, dtype
        )
    raise ValueError(f"teacher.kind: {kind!r} not allowed; allowed: toy, run")


def make_probe(chain: Chain, params: dict, spec: dict, data_dir="data") -> ProbeData:
    spec = dict(spec)
    inputs = spec.pop("inputs", "gaussian")
    seed = spec.pop("seed", 0)
    if inputs in ("gaussian", "uniform"):
        return probe_distribution(
            chain,
            params,
            spec.get("n", 2000),
            spec.get("n_test", 1000),
            inputs,
            seed,
            spec.get("scale", 1.0),
        )
    return probe_dataset(
        chain,
        params,
        inputs,
        data_dir,
        spec.get("noise", 0.0),
        seed,
        spec.get("subset", 0),
        spec.get("mask_inputs", True),
    )


def save_network(path, chain: Chain, params: dict, **extra) -> None:
    io.save_torch(path, {"chain": asdict(chain), "params": params, **extra})


def load_network(path) -> tuple[Chain, dict, dict]:
    raw = io.load_torch(path)
    try:
        chain = Chain(**raw["chain"])
        params = raw["params"]
    except (KeyError, TypeError) as err:
        raise io.ArtifactError(f"{path}: not a saved network ({err})") from None
    return chain, params, {k: v for k, v in raw.items() if k not in ("chain", "params")}


def run_expand(
    out_dir,
    teacher: dict,
    probe: dict,
    expand: dict,
    device: str = "cpu",
    data_dir="data",
    threads: int = 1,
    problem: str = "",
) -> dict:
    """Train the students: ``teacher.pt``, ``students.pt`` (stacked parameters in
    ``expand.dtype``, losses, status), ``students_history.parquet`` in ``out_dir``; resume states
    in the folder ``out_dir/.resume/students``. The teacher and its probes are float64."""
    torch.set_num_threads(threads)
    out = Path(out_dir)
    dev = devices.resolve(device)
    h = ExpandHparams.from_dict(expand)
    chain, params = make_teacher(teacher, data_dir)
    data = make_probe(chain, params, probe, data_dir).to(dev)
    s_chain, result = train_students(chain, data, h, out / ".resume" / "students")
    save_network(out / "teacher.pt", chain, params)
    save_network(
        out / "students.pt",
        s_chain,
        result.params,
        train_loss=result.train_loss,
        test_loss=result.test_loss,
        status=result.status,
        epochs=result.epochs,
    )
    io.write_parquet(
        out / "students_history.parquet", result.history.assign(stage="students", problem=problem)
    )
    return {
        "students": h.students,
        "epochs": result.epochs,
        "status": result.status,
        "best_train_loss": float(result.train_loss.min()),
    }


def run_cluster(
    out_dir,
    students_dir,
    probe: dict,
    cluster: dict,
    problem: str = "",
    device: str = "cpu",
    data_dir="data",
    threads: int = 1,
    tolerance: float = TOLERANCE,
    expand: dict | None = None,
) -> pd.DataFrame:
    """Reconstruct from the students in ``students_dir`` (in float64, whatever the students'
    dtype; ``expand``: the block they were trained by, whose ``polish`` the refit between
    layers follows): ``reconstruction.pt``, ``clusters.parquet``, ``neurons.parquet``,
    ``recovery.parquet`` (with the number of students clustered, ``cluster.converged``) and
    ``finetune_history.parquet`` in ``out_dir``. A failed
    reconstruction (no neuron of a layer survives) is recorded, not raised: its recovery row
    says so."""
    torch.set_num_threads(threads)
    out, src = Path(out_dir), Path(students_dir)
    dev = devices.resolve(device)
    t_chain, t_params, _ = load_network(src / "teacher.pt")
    s_chain, s_params, info = load_network(src / "students.pt")
    data = make_probe(t_chain, t_params, probe, data_dir).to(dev)
    students = FitResult(
        {k: v.to(dev) for k, v in s_params.items()},
        info["train_loss"],
        info["test_loss"],
        list(info["status"]),
        int(info["epochs"]),
        pd.DataFrame(),
    )
    h = ClusterHparams.from_dict(cluster)
    polish = ExpandHparams.from_dict(expand or {}).polish
    seed = seeding.derive(0, "cluster", problem)
    try:
        rec = reconstruct(s_chain, students, data, h, seed, students_polish=polish)
    except RecoveryFailed as err:
        io.write_parquet(out / "clusters.parquet", err.clusters)
        table = pd.DataFrame(
            [
                {
                    "problem": problem,
                    "layer": str(err),
                    "teacher_width": 0,
                    "inferred_width": 0,
                    "excess": 0,
                    "max_d_w": math.inf,
                    "median_d_w": math.inf,
                    "unique_matches": 0,
                    "best_student_test": float(students.test_loss.min()),
                    "reconstruction_test": math.inf,
                    "recovered": False,
                }
            ]
        )
        io.write_parquet(
            out / "neurons.parquet",
            pd.DataFrame(
                columns=["layer", "kind", "neuron", "match", "d_w", "d_a", "sign", "out_norm"]
            ),
        )
        io.write_parquet(out / "recovery.parquet", table)
        io.write_parquet(
            out / "finetune_history.parquet",
            pd.DataFrame(columns=["epoch", "student", "loss", "test_loss", "lr", "stage"]),
        )
        io.save_torch(out / "reconstruction.pt", {"failed": str(err)})
        return table
    mask = data.informative
    neurons, layers = compare(t_chain, t_params, rec.chain, rec.params, mask)
    table = recovery_table(
        problem, layers, students.test_loss, float(rec.finetune.test_loss[0]), tolerance
    ).assign(clustered_students=len(rec.clustered))
    save_network(out / "reconstruction.pt", rec.chain, rec.params)
    io.write_parquet(out / "clusters.parquet", rec.clusters)
    io.write_parquet(out / "neurons.parquet", neurons.assign(problem=problem))
    io.write_parquet(out / "recovery.parquet", table)
    histories = [
        f.history.assign(stage=f"finetune {i + 1}") for i, f in enumerate(rec.student_fits)
    ] + [rec.finetune.history.assign(stage="final")]
    io.write_parquet(
        out / "finetune_history.parquet",
        pd.concat(histories, ignore_index=True).assign(problem=problem),
    )
    return table


def run_student_lottery(
    out_dir,
    teacher: dict,
    probe: dict,
    expand: dict,
    lottery: dict,
    device: str = "cpu",
    data_dir="data",
    threads: int = 1,
    dtype: str = "float64",
) -> pd.DataFrame:
    """The students' lottery levels (:func:`pipeline.recovery.lottery.student_lottery`):
    ``level~{L}.pt`` and ``lottery.parquet`` in ``out_dir``."""
    from pipeline.recovery.lottery import student_lottery
    from pipeline.train.pruning import LotteryHparams

    torch.set_num_threads(threads)
    chain, params = make_teacher(teacher, data_dir, devices.dtype(dtype))
    data = make_probe(chain, params, probe, data_dir).to(devices.resolve(device))
    h = from_block(LotteryHparams, lottery, "lottery")
    return student_lottery(chain, data, ExpandHparams.from_dict(expand), h, out_dir)


def collect_tables(paths, out_path=None, labels=None) -> pd.DataFrame:
    """Concatenate parquet tables (e.g. every problem's ``recovery.parquet`` of a family);
    ``labels``: per path, columns to add to its rows (e.g. ``{"run": ..., "seed": ...}``)."""
    frames = [io.read_parquet(p) for p in paths]
    if labels is not None:
        frames = [f.assign(**label) for f, label in zip(frames, labels, strict=True)]
    table = pd.concat(frames, ignore_index=True)
    if out_path is not None:
        io.write_parquet(out_path, table)
    return table
