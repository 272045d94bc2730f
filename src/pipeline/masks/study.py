"""A trained run in, mask files and modularity tables out: what the workflow's rules call.

A study's ``masks`` block (see :func:`train_stage` and :func:`analyse`)::

    hparams: {steps: 300, lr: 0.03, alpha: 0.003}       # MaskHparams fields
    control: none                                        # or copy_pairs (double addition)
    stages:                                              # one mask each
      verify: {subtask: all}
      add: {subtask: add}
      add_order2: {subtask: add, seed: 2}                # another data order
      no_cat: {subtask: without_3, keep_output: true}    # output-layer mask = reference's, frozen
    reference: verify
    evaluate_on: [add, mul]                              # test-split subtasks for the accuracy
    inverse: {masks: [add, mul], io: ones}
    sharing: [add, mul]
    overlap: [[add, mul], [add, add_order2]]
    half_mask: {random_halves: 5}
    removal: true                                        # class-removal confusion tables

:func:`train_stage` trains one stage (a job per stage), :func:`train_stages` all of them in one
job, reference first. A mask file (``torch.save``, loaded with ``weights_only``) holds ``logits``
and ``fixed`` (tensor dicts), ``stage`` and ``hparams`` (the settings it was trained with) and
``history`` (rows).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from pipeline import devices, io
from pipeline.config import from_block
from pipeline.data import load as load_data
from pipeline.masks import evaluate, overlap, removal
from pipeline.masks.controls import apply_control
from pipeline.masks.layers import MaskedLayer, masked_layers, masked_params, param_roles
from pipeline.masks.sampling import binary
from pipeline.masks.train import MaskHparams, train_mask
from pipeline.masks.transfer import permuted_transfer
from pipeline.masks.views import subtask_view
from pipeline.models import build
from pipeline.train.setup import placed_data, run_model

STAGE_KEYS = ("subtask", "seed", "keep_output")
TABLES = (
    "accuracy",
    "inverse",
    "sharing",
    "overlap",
    "stability",
    "remaining",
    "half_mask",
    "confusion",
    "class_drop",
)
DEFAULT_SEED = 1234  # the paper's mask data-order seed


@dataclass
class Trained:
    model: torch.nn.Module
    splits: object  # pipeline.data.tensors.Splits
    dataset: str
    layers: list[MaskedLayer]


def mask_hparams(values: dict | None) -> MaskHparams:
    """:class:`MaskHparams` from a config dict; unknown keys are named."""
    return from_block(MaskHparams, values, "masks.hparams")


def load_trained(
    run_dir, biases: bool = False, control: str = "none", data_dir="data", device: str = "cpu"
) -> Trained:
    """The run's final weights in its model (eval mode), its data, its masked layers."""
    run_dir = Path(run_dir)
    hp = io.read_json(run_dir / "hparams.json")
    dev, dtype, splits = placed_data(hp, device, data_dir)
    model = run_model(hp, splits, hp["seed"], dtype, dev)
    model.load_state_dict(io.load_torch(run_dir / "final.pt", map_location=dev)["model"])
    model.eval().requires_grad_(False)
    layers = masked_layers(model, splits.input_shape, biases)
    apply_control(model, layers, control)
    return Trained(model, splits, hp["dataset"]["name"], layers)


def _check_stage(name: str, stage: dict) -> None:
    unknown = sorted(set(stage) - set(STAGE_KEYS))
    if unknown or "subtask" not in stage:
        raise KeyError(
            f"masks.stages.{name}: needs 'subtask'; unknown keys {unknown}; "
            f"allowed: {', '.join(STAGE_KEYS)}"
        )


def train_stage(
    run_dir,
    name: str,
    stage: dict,
    hparams: dict,
    out,
    reference=None,
    control: str = "none",
    data_dir="data",
    device: str = "cpu",
    threads: int = 1,
) -> None:
    """Train stage ``name``'s mask on the run in ``run_dir`` and write it to ``out``.

    ``reference``: the reference stage's mask file, needed when ``stage.keep_output`` is set (the
    output layer's mask is then the reference's, frozen).
    """
    torch.set_num_threads(threads)
    _check_stage(name, stage)
    h = mask_hparams(hparams)
    trained = load_trained(run_dir, h.biases, control, data_dir, device)
    fixed = {}
    if stage.get("keep_output"):
        if reference is None:
            raise ValueError(f"masks.stages.{name}.keep_output needs the reference mask")
        ref = read_masks(reference)
        fixed = {
            p: ref[p] for layer in trained.layers if layer.role == "output" for p in layer.params
        }
    view = subtask_view(trained.splits, trained.dataset, stage["subtask"])
    result = train_mask(
        trained.model,
        masked_params(trained.layers),
        view,
        h,
        seed=stage.get("seed", DEFAULT_SEED),
        fixed=fixed,
    )
    io.save_torch(
        out,
        {
            "logits": {n: t.cpu() for n, t in result.logits.items()},
            "fixed": {n: t.cpu() for n, t in result.fixed.items()},
            "stage": {"name": name, **stage},
            "hparams": asdict(h),
            "history": result.history,
        },
    )


def train_stages(
    run_dir, spec: dict, out_dir, data_dir="data", device: str = "cpu", threads: int = 1
) -> dict[str, Path]:
    """Every stage of a ``masks`` block, the reference first, into ``out_dir/<stage>.pt`` (one
    job for all stages: worth it when the stages are short). Returns ``stage -> file``."""
    stages = spec.get("stages", {})
    reference = spec.get("reference")
    if reference is not None and reference not in stages:
        raise KeyError(
            f"masks.reference: {reference!r} is not a stage; stages: " + ", ".join(stages)
        )
    order = sorted(stages, key=lambda name: name != reference)
    files = {name: Path(out_dir) / f"{name}.pt" for name in order}
    for name in order:
        train_stage(
            run_dir,
            name,
            stages[name],
            spec.get("hparams", {}),
            files[name],
            files.get(reference) if reference else None,
            spec.get("control", "none"),
            data_dir,
            device,
            threads,
        )
    return files


def read_masks(path, device="cpu") -> dict[str, torch.Tensor]:
    """The binary mask in a mask file: ``logit > 0`` for trained entries, plus the fixed ones."""
    state = io.load_torch(path, map_location=device)
    if not isinstance(state, dict) or "logits" not in state:
        raise io.ArtifactError(f"{path}: not a mask file (no 'logits')")
    return {**binary(state["logits"]), **{n: m.bool() for n, m in state["fixed"].items()}}


def mask_history(paths: dict[str, str | Path]) -> pd.DataFrame:
    """Rows ``(mask, step, loss, task_loss, kept)`` of every mask file's training history."""
    frames = [
        pd.DataFrame(io.load_torch(p)["history"]).assign(mask=name) for name, p in paths.items()
    ]
    return pd.concat(frames, ignore_index=True)


def analyse(
    run_dir,
    masks: dict[str, str | Path],
    spec: dict,
    out_dir,
    run: str = "",
    data_dir="data",
    device: str = "cpu",
    threads: int = 1,
) -> dict[str, pd.DataFrame]:
    """Every table of :data:`TABLES` for the run's masks (``stage -> mask file``), written to
    ``out_dir/<table>.parquet`` (an empty table where the spec asks for none). Each row carries
    ``run`` and ``network_size`` (the number of maskable weights)."""
    torch.set_num_threads(threads)
    h = mask_hparams(spec.get("hparams"))
    trained = load_trained(run_dir, h.biases, spec.get("control", "none"), data_dir, device)
    model, layers = trained.model, trained.layers
    loaded = {name: read_masks(path, device) for name, path in masks.items()}

    def need(*names):
        missing = [n for n in names if n not in loaded]
        if missing:
            raise KeyError(f"masks: no trained mask named {missing}; stages: {', '.join(loaded)}")
        return {n: loaded[n] for n in names}

    stages = spec.get("stages", {})
    test = {
        s: subtask_view(trained.splits, trained.dataset, s, "test")
        for s in spec.get("evaluate_on", sorted({st["subtask"] for st in stages.values()}))
    }
    reference = spec.get("reference")
    tables = dict.fromkeys(TABLES, pd.DataFrame())
    tables["accuracy"] = evaluate.masked_accuracy(model, {"none": None, **loaded}, test)
    if inv := spec.get("inverse"):
        ref = need(reference)[reference] if reference else None
        tables["inverse"] = evaluate.inverse_test(
            model, need(*inv["masks"]), test, param_roles(layers), inv.get("io", "invert"), ref
        )
    if spec.get("sharing"):
        tables["sharing"] = overlap.sharing(need(*spec["sharing"]), layers)
    if spec.get("overlap"):
        tables["overlap"] = overlap.pairwise_overlap(loaded, spec["overlap"], layers)
    same_subtask = [
        (a, b)
        for a, b in itertools.combinations(sorted(stages), 2)
        if a in loaded and b in loaded and stages[a]["subtask"] == stages[b]["subtask"]
    ]
    if same_subtask:
        rows = overlap.pairwise_overlap(loaded, same_subtask, layers)
        tables["stability"] = rows.assign(subtask=[stages[a]["subtask"] for a in rows.a])
    if reference:
        ref_mask = need(reference)[reference]
        if len(loaded) > 1:
            tables["remaining"] = overlap.remaining(loaded, reference, layers)
        if (half := spec.get("half_mask")) is not None:
            view = subtask_view(
                trained.splits, trained.dataset, stages[reference]["subtask"], "test"
            )
            tables["half_mask"] = evaluate.half_mask_test(
                model, ref_mask, layers, view, half.get("random_halves", 5), half.get("seed", 0)
            )
        if spec.get("removal"):
            removed = {
                int(m.group(1)): loaded[name]
                for name, st in stages.items()
                if name in loaded and (m := re.fullmatch(r"without_(\d+)", st["subtask"]))
            }
            view = subtask_view(trained.splits, trained.dataset, "all", "test")
            tables["confusion"], tables["class_drop"] = removal.class_removal(
                model, ref_mask, removed, view, trained.splits.num_classes
            )
    params = dict(model.named_parameters())
    size = sum(params[p].numel() for p in masked_params(layers))
    out_dir = Path(out_dir)
    for name, frame in tables.items():
        frame = frame.assign(run=run, network_size=size) if len(frame) else frame
        tables[name] = frame
        io.write_parquet(out_dir / f"{name}.parquet", frame)
    return tables


def collect(paths, out) -> pd.DataFrame:
    """One table from the per-run tables of a study (rows keep their ``run`` column); empty
    tables are skipped."""
    frames = [f for f in (io.read_parquet(p) for p in paths) if len(f)]
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    io.write_parquet(out, table)
    return table


def run_transfer(
    study: dict, spec: dict, out_dir, data_dir="data", device: str = "cpu", threads: int = 1
) -> None:
    """The permuted-input transfer experiment for a study's model and dataset; writes
    ``masks.pt`` (binary masks per permutation), ``accuracy.parquet`` and ``sharing.parquet``.

    ``spec``: ``{permutations: 11, hparams: {...}, used_init: 2.0, new_init: 2.0,
    reset_first_layer: true, seed: 0}``.
    """
    torch.set_num_threads(threads)
    dev = devices.resolve(device)
    d = {"val_fraction": 0.0, "subset": 0, **study["dataset"]}
    dtype = devices.dtype(study.get("train", {}).get("dtype", "float32"), "train.dtype")
    splits = load_data(d["name"], data_dir, d["val_fraction"], d["subset"], dev, dtype)
    options = {k: v for k, v in study["model"].items() if k != "name"}

    def fresh(seed):
        return build(
            study["model"]["name"], splits.input_shape, splits.num_outputs, options, seed, dtype
        ).to(dev)

    masks, accuracy, sharing = permuted_transfer(
        fresh,
        splits,
        d["name"],
        spec.get("permutations", 11),
        mask_hparams(spec.get("hparams")),
        spec.get("seed", 0),
        spec.get("used_init", 2.0),
        spec.get("new_init", 2.0),
        spec.get("reset_first_layer", True),
    )
    out_dir = Path(out_dir)
    io.save_torch(
        out_dir / "masks.pt", {k: {n: t.cpu() for n, t in m.items()} for k, m in masks.items()}
    )
    io.write_parquet(out_dir / "accuracy.parquet", accuracy)
    io.write_parquet(out_dir / "sharing.parquet", sharing)
