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
from pipeline.config import (
    Run,
    dataset_problems,
    expand_runs,
    model_problems,
    selection_problems,
)
from pipeline.modelsym import register_stitching_layer, sample_pairs
from pipeline.modelsym.similarity import register_similarity
from pipeline.studies import StudyKind, register_study_kind

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


def pairs(study: dict, zoo: str) -> list[tuple[int, int]]:
    return sample_pairs(
        study["zoos"][zoo]["seeds"], study.get("pairs", 1), study.get("pair_seed", 0)
    )


def _registry_problems(where: str, block: str, registry, name: str, options) -> list[str]:
    """``name`` must be registered in ``registry`` (named at ``where``) and each option (at
    ``block``.option; ``grid.<option>`` for a grid's) a keyword of its function."""
    entries = registry.entries()
    if name not in entries:
        return [f"{where}: unknown {registry.kind} {name!r}; allowed: {', '.join(sorted(entries))}"]
    params = entries[name].params
    return [
        f"{block}.{key}: unknown option of {registry.kind} {name!r}; allowed: {', '.join(params)}"
        for key in options
        if key.removeprefix("grid.") not in params
    ]


class ModelsymStudy(StudyKind):
    """``kind: modelsym``: zoos, their features, alignment and stitching over sampled pairs,
    and the rotation control; the files each job reads and writes."""

    schema = "modelsym_study"
    keys = (
        "test_selection",
        "dataset",
        "probe",
        "zoos",
        "pairs",
        "pair_seed",
        "alignment",
        "stitching",
        "rotation",
        "rerun_on_code_change",
    )
    blocks = {
        "dataset": "pipeline.config:DatasetHparams",
        "train": "pipeline.config:TrainHparams",
        "checkpoints": "pipeline.config:CheckpointHparams",
        "stitch_settings": "pipeline.modelsym.stitching:StitchSettings",
    }
    #: the parts written as one table each (``tables/<part>.parquet``)
    PARTS = ("alignment", "stitching", "rotation")

    def plan_runs(self) -> list[Run]:
        return zoo_runs(self.name, self.spec)

    def rules(self) -> set[str]:
        return super().rules() | {"modelsym"}

    def tables(self) -> list[str]:
        return [f"tables/{part}" for part in self.PARTS if part in self.spec]

    def recorded_jobs(self) -> list[tuple[str, str, dict]]:
        """The vectorised zoos' training jobs: ``(summary.json, code target, config)`` of each
        chunk (each records the fingerprint of the code that trained it)."""
        out = []
        for zoo, c, _ in self.zoo_chunks():
            summary = f"results/{self.name}/zoo/{zoo}/chunk~{c}/summary.json"
            out.append((summary, ZOO_CODE, zoo_hparams(self.spec, zoo)))
        return out

    def problems(self, studies: dict) -> list[str]:
        where, spec = f"studies.{self.name}", self.spec
        out = dataset_problems(f"{where}.dataset", spec.get("dataset", "digits"))
        blocks = []
        for zoo, block in spec.get("zoos", {}).items():
            out += model_problems(f"{where}.zoos.{zoo}.model", block["model"])
            first = _zoo_study(spec, {**block, "seeds": block["seeds"][:1]})
            blocks.append((f"{where}.zoos.{zoo}.train", first))
        out += selection_problems(where, blocks, spec)
        for metric, options in spec.get("alignment", {}).get("metrics", {}).items():
            at = f"{where}.alignment.metrics.{metric}"
            out += _registry_problems(at, at, register_similarity, metric, options)
        for label, typ in spec.get("stitching", {}).get("types", {}).items():
            at = f"{where}.stitching.types.{label}"
            options = [k for k in typ if k not in ("type", "settings", "grid")]
            options += [f"grid.{k}" for k in typ.get("grid", {})]
            out += _registry_problems(
                f"{at}.type", at, register_stitching_layer, typ["type"], options
            )
        for part in self.PARTS:
            unknown = [z for z in spec.get(part, {}).get("zoos") or [] if z not in spec["zoos"]]
            if unknown:
                out.append(
                    f"{where}.{part}.zoos: unknown zoo {', '.join(map(repr, unknown))}; the "
                    f"study's zoos: {', '.join(spec['zoos'])}"
                )
        if not spec.get("dataset", {}).get("val_fraction", 0.1) > 0:
            out.append(
                f"{where}.dataset.val_fraction: zoo members are selected on the validation "
                "split; it must be > 0"
            )
        return out

    # -- the files of the jobs ----------------------------------------------------------------
    def zoo_chunks(self) -> list[tuple[str, int, list[int]]]:
        """``(zoo, chunk index, seeds)`` of every vectorised zoo job."""
        return [
            (zoo, c, seeds)
            for zoo, block in self.spec["zoos"].items()
            if block.get("vectorised", False)
            for c, seeds in enumerate(chunks(self.spec, zoo))
        ]

    def member_file(self, zoo: str, seed) -> str:
        """A zoo member's file: from its vectorised chunk, or selected from its own run."""
        if self.spec["zoos"][zoo].get("vectorised", False):
            for c, seeds in enumerate(chunks(self.spec, zoo)):
                if int(seed) in seeds:
                    return f"results/{self.name}/zoo/{zoo}/chunk~{c}/seed~{seed}.pt"
            raise KeyError(f"study {self.name}: zoo {zoo} has no seed {seed}")
        return f"results/{self.name}/zoo/{zoo}/selected/seed~{seed}.pt"

    def features_file(self, zoo: str, seed) -> str:
        return f"results/{self.name}/features/{zoo}/seed~{seed}.h5"

    def zoos_of(self, part: str) -> list[str]:
        """The zoos a part (alignment, stitching, rotation) uses (default: every zoo)."""
        return self.spec[part].get("zoos") or list(self.spec["zoos"])

    def pair_entries(self, part: str) -> list[dict]:
        """Every sampled pair of the zoos ``part`` (alignment, stitching) uses, with the member
        and feature files of both sides."""
        return [
            {
                "zoo": zoo,
                "seed_a": a,
                "seed_b": b,
                "member_a": self.member_file(zoo, a),
                "member_b": self.member_file(zoo, b),
                "features_a": self.features_file(zoo, a),
                "features_b": self.features_file(zoo, b),
            }
            for zoo in self.zoos_of(part)
            for a, b in pairs(self.spec, zoo)
        ]

    def rotation_members(self) -> list[dict]:
        return [
            {"zoo": zoo, "seed": seed, "member": self.member_file(zoo, seed)}
            for zoo in self.zoos_of("rotation")
            for seed in self.spec["zoos"][zoo]["seeds"]
        ]

    def measures(self, part: str) -> list[str]:
        """The per-measure tables of ``part``: similarity names, or stitching type labels."""
        block = self.spec[part]
        return list(block["metrics"] if part == "alignment" else block["types"])


@register_study_kind("modelsym")
def modelsym_kind() -> type[StudyKind]:
    return ModelsymStudy


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
