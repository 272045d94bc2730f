"""Config-level entry points of the teleportation experiments: one call per Snakemake rule, from
a study's spec (plain dicts) to a table. Models are built with :func:`pipeline.models.build`
(seeded), data comes from :func:`pipeline.data.load`; every random choice derives from ``seed``.

Spec keys (defaults in brackets):

- micro (Fig. 4): ``dataset``, ``models`` (model blocks with an optional ``label``),
  ``batch_sizes`` [[8, 64]], ``iterations`` [100], ``cob_range`` [0.001], ``sampling``
  [intra_landscape], ``inputs`` [dataset] or ``random`` (uniform inputs, random labels);
- statistics (Fig. 7): ``dataset``, ``models``, ``batch_size`` [32], ``batches`` [10],
  ``teleports`` [10], ``cob_ranges`` [15 values in 0.01 .. 0.9], ``sampling`` [intra_landscape];
- histograms (Fig. 11): ``dataset``, ``model`` (one block), ``cob_range`` [0.9], ``sampling``
  [intra_landscape], ``bins`` [1000];
- interpolation (Fig. 5): ``alphas`` [101 values in -0.5 .. 1.5], ``cob_range`` [0.9],
  ``sampling`` [intra_landscape], ``same_cob`` [false], ``batch_size`` [1000].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from pipeline import io, seeding
from pipeline.data import load
from pipeline.models import build
from pipeline.teleport.histograms import weight_histograms
from pipeline.teleport.interpolation import interpolation_profile
from pipeline.teleport.micro import micro_teleport_angles
from pipeline.teleport.statistics import teleport_statistics
from pipeline.train.optim import loss_fn


def _options(block: dict) -> dict:
    return {k: v for k, v in block.items() if k not in ("name", "label")}


def _label(block: dict) -> str:
    return str(block.get("label", block["name"]))


def _model(block: dict, data, seed: int):
    if "name" not in block:
        raise KeyError(f"model block {block}: needs a name")
    return build(block["name"], data.input_shape, data.num_outputs, _options(block), seed)


def _batches(data, size: int, count: int, seed: int, random_inputs: bool = False):
    out = []
    for epoch in range(count):
        x, y = next(iter(data.train.train_batches(size, True, seed, epoch)))
        if random_inputs:
            gen = seeding.generator(seed, "random-inputs", epoch)
            x = torch.rand(x.shape, generator=gen, dtype=x.dtype).to(x.device)
            y = torch.randint(0, data.num_classes, y.shape, generator=gen).to(y.device)
        out.append((x, y))
    return out


def micro_table(spec: dict, data_dir, seed: int = 0) -> pd.DataFrame:
    """Micro-teleport angles for every model x batch size (columns of
    :func:`~pipeline.teleport.micro.micro_teleport_angles` plus model, batch_size)."""
    data = load(spec.get("dataset", "digits"), data_dir)
    random_inputs = spec.get("inputs", "dataset") == "random"
    frames = []
    for block in spec["models"]:
        for size in spec.get("batch_sizes", [8, 64]):
            model = _model(block, data, seed).train()
            iterations = int(spec.get("iterations", 100))
            batches = _batches(data, size, min(iterations, 10), seed, random_inputs)
            df = micro_teleport_angles(
                model,
                batches,
                loss_fn("ce"),
                iterations,
                float(spec.get("cob_range", 1e-3)),
                spec.get("sampling", "intra_landscape"),
                seed,
                data.input_shape,
                stream=(_label(block), size),
            )
            frames.append(df.assign(model=_label(block), batch_size=size))
    return pd.concat(frames, ignore_index=True)


def statistics_table(spec: dict, data_dir, seed: int = 0) -> pd.DataFrame:
    """Gradient/weight-norm changes per model and CoB range (plus a model column)."""
    data = load(spec.get("dataset", "digits"), data_dir)
    ranges = spec.get("cob_ranges") or list(np.linspace(0.01, 0.9, 15))
    frames = []
    for block in spec["models"]:
        model = _model(block, data, seed)
        batches = _batches(
            data, int(spec.get("batch_size", 32)), int(spec.get("batches", 10)), seed
        )
        df = teleport_statistics(
            model,
            data.input_shape,
            batches,
            loss_fn("ce"),
            ranges,
            spec.get("sampling", "intra_landscape"),
            int(spec.get("teleports", 10)),
            seed,
        )
        frames.append(df.assign(model=_label(block)))
    return pd.concat(frames, ignore_index=True)


def histogram_table(spec: dict, data_dir, seed: int = 0) -> pd.DataFrame:
    """Weight densities (init, teleported, same distribution) of one freshly built model."""
    data = load(spec.get("dataset", "digits"), data_dir)
    model = _model(spec["model"], data, seed)
    return weight_histograms(
        model,
        data.input_shape,
        float(spec.get("cob_range", 0.9)),
        spec.get("sampling", "intra_landscape"),
        int(spec.get("bins", 1000)),
        seed,
    )


def interpolation_table(run_a, run_b, spec: dict, data_dir, seed: int = 0) -> pd.DataFrame:
    """The interpolation path between two trained runs (directories with ``hparams.json`` and
    ``final.pt``, the same model and dataset), before and after teleporting both."""
    hp = io.read_json(Path(run_a) / "hparams.json")
    other = io.read_json(Path(run_b) / "hparams.json")
    if (hp["model"], hp["dataset"]) != (other["model"], other["dataset"]):
        raise ValueError(f"{run_a} and {run_b}: interpolation needs the same model and dataset")
    d = hp["dataset"]
    data = load(d["name"], data_dir, d.get("val_fraction", 0.1), d.get("subset", 0))
    model = _model(hp["model"], data, seed)
    states = [io.load_torch(Path(r) / "final.pt")["model"] for r in (run_a, run_b)]
    splits = {
        "train": data.train,
        **({"val": data.val} if data.val is not None else {}),
        "test": data.test,
    }
    common = dict(
        alphas=spec.get("alphas"),
        cob_range=float(spec.get("cob_range", 0.9)),
        sampling=spec.get("sampling", "intra_landscape"),
        same_cob=bool(spec.get("same_cob")),
        seed=seed,
        batch_size=int(spec.get("batch_size", 1000)),
    )
    loss = loss_fn(hp["train"].get("loss", "ce"))
    frames = [
        interpolation_profile(model, *states, data.input_shape, splits, loss, teleport=tp, **common)
        for tp in (False, True)
    ]
    return pd.concat(frames, ignore_index=True)


def write_study_table(kind: str, out, spec: dict, data_dir, runs: dict | None = None) -> None:
    """Compute one teleportation table and write it (parquet) to ``out``.

    ``kind``: ``micro``, ``statistics``, ``histograms`` (``spec`` is the study block),
    ``interpolation`` (``runs``: the two runs, ``spec`` the study's interpolation block) or
    ``validation`` (``runs``: every run of a Figure 6 grid, ``run name -> directory``).
    """
    from pipeline.teleport.validation import validation_table

    seed = int(spec.get("seed", 0))
    if kind == "micro":
        table = micro_table(spec, data_dir, seed)
    elif kind == "statistics":
        table = statistics_table(spec, data_dir, seed)
    elif kind == "histograms":
        table = histogram_table(spec, data_dir, seed)
    elif kind == "interpolation":
        run_a, run_b = list(runs.values())[:2]
        table = interpolation_table(run_a, run_b, spec, data_dir, seed)
    elif kind == "validation":
        table = validation_table(runs)
    else:
        raise ValueError(
            f"no teleportation table {kind!r}; allowed: micro, statistics, "
            "histograms, interpolation, validation"
        )
    io.write_parquet(out, table)
