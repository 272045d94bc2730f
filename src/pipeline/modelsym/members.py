"""Zoo members: one trained model's selected weights in one file, whoever trained it.

A member file (``torch.save`` of plain containers, loaded with ``weights_only=True``) holds::

    model     the state dict at the selected checkpoint
    hparams   the run's resolved hyperparameters (model, dataset, train, checkpoints, seed)
    info      input_shape, num_classes (what rebuilding the model needs)
    epoch, step, metrics   where the checkpoint was taken, its val/test loss and accuracy

Vectorised zoo training (:mod:`pipeline.modelsym.zoo`) writes them directly; a model trained as an
ordinary run (BatchNorm models) becomes a member by :func:`select_checkpoint`, which picks the
checkpoint with the best *validation* metric from the run's manifest: never the test set.
"""

from __future__ import annotations

from pathlib import Path

from pipeline import io

KEYS = ("model", "hparams", "info", "epoch", "step", "metrics")


def save_member(
    path, state: dict, hparams: dict, info: dict, epoch: int, step: int, metrics: dict
) -> Path:
    record = {
        "model": {k: v.detach().cpu().clone() for k, v in state.items()},
        "hparams": hparams,
        "info": info,
        "epoch": int(epoch),
        "step": int(step),
        "metrics": {k: float(v) for k, v in metrics.items()},
    }
    io.save_torch(path, record)
    return Path(path)


def read_member(path) -> dict:
    """The member record, checked for its keys (:class:`~pipeline.io.ArtifactError` if not)."""
    record = io.load_torch(path)
    missing = [k for k in KEYS if not isinstance(record, dict) or k not in record]
    if missing:
        raise io.ArtifactError(f"{path}: not a zoo member file (lacks {missing})")
    return record


def build_member(record: dict, device="cpu", dtype=None):
    """The member's model with its selected weights, in eval mode."""
    import torch

    from pipeline.models import build

    h = record["hparams"]
    options = {k: v for k, v in h["model"].items() if k != "name"}
    if dtype is None:
        dtype = {"float64": torch.float64}.get(h.get("train", {}).get("dtype"), torch.float32)
    model = build(
        h["model"]["name"],
        record["info"]["input_shape"],
        record["info"]["num_classes"],
        options,
        h.get("seed", 0),
        dtype,
    )
    model.load_state_dict(record["model"])
    return model.to(device).eval()


def load_member(path, device="cpu", dtype=None):
    """``(model, record)`` for a member file."""
    record = read_member(path)
    return build_member(record, device, dtype), record


def member_data(record: dict, data_dir, device="cpu", dtype=None):
    """The member's dataset with the same train/validation/test splits it was trained on."""
    from pipeline.data import load

    d = record["hparams"]["dataset"]
    return load(d["name"], data_dir, d.get("val_fraction", 0.1), d.get("subset", 0), device, dtype)


def select_checkpoint(run_dir, out, metric: str = "val_accuracy") -> dict:
    """Write the member file of an ordinary run: its checkpoint with the best ``metric``.

    ``metric`` must be a validation metric (``val_accuracy`` or ``val_loss``); the first of
    equally good checkpoints wins. Returns the chosen manifest entry.
    """
    if not metric.startswith("val_"):
        raise ValueError(
            f"checkpoint selection metric {metric!r}: only val_* metrics are allowed "
            "(selection on the test set biases every downstream number)"
        )
    run_dir = Path(run_dir)
    manifest = io.read_json(run_dir / "checkpoints.json")
    scored = [e for e in manifest if metric in e.get("metrics", {})]
    if not scored:
        raise io.ArtifactError(
            f"{run_dir / 'checkpoints.json'}: no checkpoint carries {metric!r}; train with "
            "dataset.val_fraction > 0 and checkpoints.epoch_end: true"
        )
    sign = 1.0 if metric.endswith("accuracy") else -1.0
    best = max(scored, key=lambda e: (sign * e["metrics"][metric], -e["step"]))
    state = io.load_torch(run_dir / best["file"])
    hparams = io.read_json(run_dir / "hparams.json")
    save_member(
        out, state["model"], hparams, state["info"], best["epoch"], best["step"], best["metrics"]
    )
    return best
