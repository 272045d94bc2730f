"""A ``modelsym`` study, from its config block to the calls its rules make.

The block (see config/schema/config.schema.yaml, ``modelsym_study``)::

    dataset: {name: digits, val_fraction: 0.2}
    probe: {split: test, size: 0}                     # features on these examples
    zoos:
      mlp: {model: {...}, seeds: [0, 1, 2, 3], train: {...}, vectorised: true, chunk: 25}
      cnn_bn: {model: {...}, seeds: [0, 1], train: {...}, vectorised: false}
    pairs: 2                                          # pairs per zoo (sample_pairs)
    alignment: {metrics: {grelu_cka: {}, ...}, zoos: [...]}
    stitching: {types: {label: {type: ..., ...}}, layers: activations, settings: {...}, zoos: [...]}
    rotation: {zoos: [...], groups: [...], ...}

Vectorised zoos (no BatchNorm, no dropout) train as one ``train_zoo`` job per chunk of seeds;
the others train as ordinary runs (``zoo~<zoo>/seed~<s>``) and
:func:`~pipeline.modelsym.members.select_checkpoint` turns each into a member on its validation
split. Everything parse-time here is torch-free.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import io
from pipeline.config import Run, expand_runs, register_recorded_jobs, register_study_kind
from pipeline.modelsym import sample_pairs

#: What a vectorised zoo job's recorded code fingerprint covers (config: :func:`zoo_hparams`).
ZOO_CODE = "pipeline.modelsym.study:train_members"


def _zoo_study(study: dict, zoo: dict) -> dict:
    return {
        "kind": "train",
        "dataset": study["dataset"],
        "model": zoo["model"],
        "train": zoo.get("train", {}),
        "checkpoints": zoo.get("checkpoints", {}),
        "seeds": zoo["seeds"],
    }


@register_study_kind("modelsym")
def zoo_runs(name: str, study: dict) -> list[Run]:
    """The ordinary training runs of the study's non-vectorised zoos (``zoo~<zoo>/seed~<s>``)."""
    runs = []
    for zoo, block in study["zoos"].items():
        if block.get("vectorised", False):
            continue
        for run in expand_runs(name, _zoo_study(study, block)):
            runs.append(Run(name, f"zoo~{zoo}/{run.name}", run.seed, run.hparams))
    return runs


def zoo_hparams(study: dict, zoo: str) -> dict:
    """The non-default hyperparameters every member of a vectorised zoo shares (``seed`` is
    per member); :func:`pipeline.config.resolve_hparams` gives the full set."""
    return expand_runs("zoo", _zoo_study(study, study["zoos"][zoo]))[0].nondefault


def chunks(study: dict, zoo: str) -> list[list[int]]:
    """The seeds of a vectorised zoo, in jobs of ``chunk`` members (default: one job)."""
    block = study["zoos"][zoo]
    seeds = list(block["seeds"])
    size = block.get("chunk", len(seeds)) or len(seeds)
    return [seeds[i : i + size] for i in range(0, len(seeds), size)]


@register_recorded_jobs("modelsym")
def recorded_jobs(name: str, study: dict) -> list[tuple[str, str, dict]]:
    """The vectorised zoos' training jobs: ``(summary.json, code target, config)`` of each chunk
    (each records the fingerprint of the code that trained it, see :mod:`pipeline.stale`)."""
    out = []
    for zoo, block in study.get("zoos", {}).items():
        if block.get("vectorised", False):
            hparams = zoo_hparams(study, zoo)
            for c in range(len(chunks(study, zoo))):
                out.append((f"results/{name}/zoo/{zoo}/chunk~{c}/summary.json", ZOO_CODE, hparams))
    return out


def pairs(study: dict, zoo: str) -> list[tuple[int, int]]:
    return sample_pairs(
        study["zoos"][zoo]["seeds"], study.get("pairs", 1), study.get("pair_seed", 0)
    )


def train_members(
    out_dir,
    nondefault: dict,
    seeds: list[int],
    device="cpu",
    data_dir="data",
    threads: int = 1,
    code: str | None = None,
) -> dict:
    """One vectorised job: a member file per seed (see :func:`pipeline.modelsym.zoo.train_zoo`);
    ``nondefault``: :func:`zoo_hparams`. ``summary.json`` records the code fingerprint
    (:data:`ZOO_CODE`, as for runs: :mod:`pipeline.train.extensions`): ``code``, or computed here
    if not given."""
    from pipeline.config import resolve_hparams
    from pipeline.modelsym.zoo import train_zoo

    summary = train_zoo(
        out_dir,
        resolve_hparams(nondefault),
        seeds,
        device=device,
        data_dir=data_dir,
        threads=threads,
    )
    from pipeline.fingerprint import record_code

    return record_code(summary, Path(out_dir) / "summary.json", ZOO_CODE, nondefault, code)


def extract_all(members: list, outs: list, data_dir="data", device="cpu", **probe) -> None:
    """Features of several members (one job per zoo), each to its own HDF5 file."""
    from pipeline.modelsym.features import extract_features

    for member, out in zip(members, outs, strict=True):
        extract_features(member, out, data_dir=data_dir, device=device, **probe)


def alignment_table(
    metric: str,
    options: dict,
    entries: list[dict],
    out,
    data_dir="data",
    device="cpu",
    threads: int = 1,
):
    """Measure ``metric`` on every pair (``entries``: dicts with zoo, seed_a, seed_b, member_a,
    member_b, features_a, features_b); one table with zoo/seed columns, written to ``out``."""
    import pandas as pd
    import torch

    from pipeline.modelsym.similarity import Pair, compare

    torch.set_num_threads(threads)
    frames = []
    for e in entries:
        pair = Pair(
            Path(e["member_a"]),
            Path(e["member_b"]),
            Path(e["features_a"]),
            Path(e["features_b"]),
            data_dir,
            device,
        )
        frames.append(
            compare(metric, pair, options).assign(
                zoo=e["zoo"], seed_a=e["seed_a"], seed_b=e["seed_b"]
            )
        )
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    io.write_parquet(out, table)
    return table


def stitching_table(
    label: str,
    spec: dict,
    entries: list[dict],
    layers,
    settings: dict,
    out,
    data_dir="data",
    device="cpu",
    threads: int = 1,
):
    """Stitching type ``label`` on every pair (bottom a, top b) of ``entries``; one table."""
    import pandas as pd
    import torch

    from pipeline.modelsym.stitching import stitch_pair

    torch.set_num_threads(threads)
    frames = [
        stitch_pair(
            e["member_a"],
            e["member_b"],
            {label: spec},
            layers,
            settings,
            data_dir,
            device,
            seed=int(e["seed_a"]) * 1000 + int(e["seed_b"]),
        ).assign(zoo=e["zoo"], seed_a=e["seed_a"], seed_b=e["seed_b"])
        for e in entries
    ]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    io.write_parquet(out, table)
    return table


def rotation_table(
    members: list[dict], options: dict, out, data_dir="data", device="cpu", threads: int = 1
):
    """The rotation/projection control on every listed member (dicts with zoo, seed, member)."""
    import pandas as pd
    import torch

    from pipeline.modelsym.rotation import rotation_control

    torch.set_num_threads(threads)
    options = {k: v for k, v in options.items() if k != "zoos"}
    frames = [
        rotation_control(
            m["member"], data_dir=data_dir, device=device, seed=int(m["seed"]), **options
        ).assign(zoo=m["zoo"], seed=m["seed"])
        for m in members
    ]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    io.write_parquet(out, table)
    return table


def collect(paths, out):
    """Concatenate tables (e.g. every alignment metric's) into one, written to ``out``."""
    import pandas as pd

    frames = [f for f in (io.read_parquet(p) for p in paths) if len(f)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    io.write_parquet(out, table)
    return table
