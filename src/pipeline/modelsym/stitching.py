"""Training a stitching layer, and the stitching penalty of a pair of zoo members.

Protocol (per pair, layer and stitching type): build ``S``, initialise it from features where
its type asks (activation matching, Procrustes), train only ``S`` on the training split with
cross-entropy plus its regulariser, projecting after each step; evaluate on the *validation*
split after every epoch (epoch 0 included) and keep the best weights (reloaded between
phases: the Birkhoff layer's scales-off then scales-on schedule); report that state on the
test split. With ``bn_mode: train`` every evaluation is preceded by the BN re-estimation pass.

Stitching penalty = mean test accuracy of the two members - stitched test accuracy (in
accuracy units, not percent); the loss penalty is the stitched test loss minus the members'
mean. A type spec may carry ``grid: {option: [values]}``: every combination trains and the best
on validation is kept (the cross-validated alpha of the Birkhoff layer, whose validation split
is held out of the training data, disjoint from it).
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import asdict, dataclass

import pandas as pd
import torch

from pipeline import seeding
from pipeline.config import from_block
from pipeline.modelsym.matching import evaluate_model
from pipeline.modelsym.stitch_layers import register_stitching_layer
from pipeline.modelsym.stitched import (
    build_stitched,
    has_batch_norm,
    layer_channels,
    reestimate_stitched,
    set_training,
)
from pipeline.train.engine import Engine
from pipeline.train.optim import SGD, Adam, multi_head_ce


@dataclass(frozen=True)
class StitchSettings:
    epochs: int = 20
    optimizer: str = "sgd"
    lr: float = 1e-3
    momentum: float = 0.0
    wd: float = 1e-4
    batch_size: int = 32
    bn_mode: str = "eval"
    fit_examples: int = 2048
    eval_batch_size: int = 1024

    @classmethod
    def from_dict(cls, options: dict | None, where: str = "stitching.settings") -> StitchSettings:
        return from_block(cls, options, where)


def _optimizer(groups, s: StitchSettings):
    if s.optimizer == "sgd":
        return SGD(groups, lr=s.lr, momentum=s.momentum)
    if s.optimizer == "adam":
        return Adam(groups, lr=s.lr)
    raise ValueError(f"stitching optimizer: {s.optimizer!r} not allowed; allowed: sgd, adam")


def _train_inputs(data, batch_size):
    def batches():
        for x, _ in data.train.eval_batches(batch_size):
            yield x

    return batches


def _evaluate(gm, split, data, s: StitchSettings):
    """Loss and accuracy of the stitched model; with ``bn_mode: train`` after BN re-estimation
    (the re-estimated statistics stay in ``gm``)."""
    if gm.bn_mode == "train" and has_batch_norm(gm):
        reestimate_stitched(gm, _train_inputs(data, s.eval_batch_size)())
    set_training(gm, False)
    return evaluate_model(gm, split, s.eval_batch_size)


class _StitchTask:
    """One phase of stitching-layer training on the engine (:mod:`pipeline.train.engine`):
    engine epoch ``e`` is the training's epoch ``offset + e`` (its batch order); the loss is
    cross-entropy plus ``S``'s regulariser, ``S`` is projected after each step; at each epoch's
    end the loss must be finite and ``consider(phase, epochs done)`` evaluates on validation.
    No resume state (``store=None``)."""

    def __init__(self, gm, data, settings: StitchSettings, seed: int, opt, phase, offset, consider):
        self.gm, self.stitch, self.data, self.settings = gm, gm.stitch, data, settings
        self.seed, self.opt, self.phase, self.offset = seed, opt, phase, offset
        self.consider = consider
        self.steps_per_epoch = data.train.num_batches(settings.batch_size, True)

    def batches(self, epoch: int, start: int):
        set_training(self.gm, True)
        return self.data.train.train_batches(
            self.settings.batch_size, True, self.seed, self.offset + epoch, start
        )

    def forward_backward(self, batch):
        x, y = batch
        self.opt.zero_grad(set_to_none=True)
        loss = multi_head_ce(self.gm(x), y) + self.stitch.regulariser().to(x.dtype)
        loss.backward()
        return loss

    def update(self) -> None:
        self.opt.step()
        self.stitch.project()

    def check(self, loss, epoch_end: bool) -> str | None:
        if epoch_end and not torch.isfinite(loss):
            return "stitching loss became NaN/inf; lower the stitching lr"
        return None

    def end_epoch(self, epoch: int) -> dict:
        self.consider(self.phase, self.offset + epoch + 1)
        return {}


def train_stitch(gm, data, settings: StitchSettings, seed: int) -> dict:
    """Train ``gm.stitch``, each phase an engine run with a fresh optimizer (a non-finite loss
    at an epoch's end raises :class:`pipeline.train.engine.TrainingDiverged`); return the
    validation-selected state's val/test metrics."""
    stitch = gm.stitch
    history = []
    best = {"val_accuracy": -1.0}

    def consider(phase, epoch):
        snapshot = copy.deepcopy(gm.state_dict())
        val_loss, val_acc = _evaluate(gm, data.val, data, settings)
        history.append((phase, epoch, val_loss, val_acc))
        if val_acc > best["val_accuracy"]:
            best.update(
                val_accuracy=val_acc,
                val_loss=val_loss,
                phase=phase,
                epoch=epoch,
                state=copy.deepcopy(gm.state_dict()),
            )
        gm.load_state_dict(snapshot)  # training-time BN statistics back (bn_mode: train)

    phases = stitch.phases(settings.epochs) if stitch.trainable else [0]
    done = 0
    for phase, epochs in enumerate(phases):
        stitch.set_phase(phase)
        if phase > 0:
            gm.load_state_dict(best["state"])
        consider(phase, done)
        if epochs == 0:
            continue
        opt = _optimizer(stitch.param_groups(settings.wd), settings)
        task = _StitchTask(gm, data, settings, seed, opt, phase, done, consider)
        Engine(task, epochs, where="stitching").run()
        done += epochs
    gm.load_state_dict(best["state"])
    stitch.set_phase(best["phase"])
    set_training(gm, False)
    test_loss, test_acc = evaluate_model(gm, data.test, settings.eval_batch_size)
    return {
        "val_accuracy": best["val_accuracy"],
        "val_loss": best["val_loss"],
        "test_accuracy": test_acc,
        "test_loss": test_loss,
        "selected_epoch": best["epoch"],
        "selected_phase": best["phase"],
        **stitch.report(),
        "history": history,
    }


def fit_features(bottom, top, layer: str, data, examples: int, batch_size: int):
    """Features of both models at ``layer`` on the first ``examples`` training examples."""
    from pipeline.modelsym.probes import feature_extractor

    xs, ys = [], []
    fa, fb = feature_extractor(bottom, [layer]).eval(), feature_extractor(top, [layer]).eval()
    n = 0
    with torch.no_grad():
        for x, _ in data.train.eval_batches(batch_size):
            x = x[: examples - n]
            xs.append(fa(x)[1][layer])
            ys.append(fb(x)[1][layer])
            n += len(x)
            if n >= examples:
                break
    return torch.cat(xs), torch.cat(ys)


def _grid(spec: dict):
    """``(registry type, [options...])`` of a type spec ``{type, grid?, **options}``."""
    spec = dict(spec)
    kind = spec.pop("type", None)
    if kind is None:
        raise ValueError(
            f"stitching type spec {spec}: needs a 'type' key; allowed: "
            + ", ".join(register_stitching_layer.names())
        )
    register_stitching_layer.entry(kind)
    grid = spec.pop("grid", {}) or {}
    keys = list(grid)
    combos = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*grid.values())] or [
        {}
    ]
    return kind, [{**spec, **c} for c in combos], keys


def stitch_layer_pair(
    bottom, top, layer: str, data, spec: dict, settings: StitchSettings, seed: int
) -> dict:
    """Stitch ``bottom`` into ``top`` at ``layer`` with the type ``spec``; with a grid, the
    validation-best option set. Returns the metrics of :func:`train_stitch` and the options."""
    kind, option_sets, grid_keys = _grid(spec)
    builder = register_stitching_layer.get(kind)
    dtype = next(bottom.parameters()).dtype
    example = next(data.train.eval_batches(2))[0]
    n_in, n_out = layer_channels(bottom, layer, example), layer_channels(top, layer, example)
    features = None
    results = []
    for options in option_sets:
        torch.manual_seed(
            seeding.derive(seed, "stitch", layer, kind, json.dumps(options, sort_keys=True))
        )
        stitch = builder(n_in, n_out, **options).to(dtype)
        if stitch.needs_fit:
            if features is None:
                features = fit_features(
                    bottom, top, layer, data, settings.fit_examples, settings.eval_batch_size
                )
            stitch.fit(*features)
        gm = build_stitched(bottom, top, layer, stitch, settings.bn_mode)
        res = train_stitch(gm, data, settings, seed)
        results.append((options, res))
    options, chosen = max(results, key=lambda r: r[1]["val_accuracy"])
    out = {**chosen, "type": kind, "options": json.dumps(options, sort_keys=True)}
    if grid_keys:
        out["grid"] = json.dumps(
            [
                {**{k: o[k] for k in grid_keys}, "val_accuracy": r["val_accuracy"]}
                for o, r in results
            ]
        )
    return out


def stitch_pair(
    member_a,
    member_b,
    types: dict,
    layers="activations",
    settings: dict | None = None,
    data_dir="data",
    device: str = "cpu",
    seed: int = 0,
) -> pd.DataFrame:
    """The stitching table of members ``a`` (bottom) and ``b`` (top): one row per layer and type.

    ``types``: ``{label: {"type": registered name, **options, "grid"?: {...}, "settings"?:
    {...}}}`` (a type's ``settings`` override the shared ones for that type: the G_ReLU layer's
    projected SGD wants another learning rate than an unconstrained map); ``layers``:
    ``"activations"`` or a list of node names; ``settings``: :class:`StitchSettings` fields.
    """
    from pipeline import devices
    from pipeline.modelsym.members import load_member, member_data
    from pipeline.modelsym.probes import select_layers

    s = StitchSettings.from_dict(settings)
    dev = devices.resolve(device)
    model_a, rec_a = load_member(member_a, dev)
    model_b, rec_b = load_member(member_b, dev)
    if rec_a["hparams"]["model"] != rec_b["hparams"]["model"] or (
        rec_a["hparams"]["dataset"] != rec_b["hparams"]["dataset"]
    ):
        raise ValueError(
            f"{member_a} and {member_b}: stitching needs two members of one zoo "
            "(same model and dataset)"
        )
    data = member_data(rec_a, data_dir, dev, next(model_a.parameters()).dtype)
    if data.val is None or not len(data.val):
        raise ValueError(
            "stitching selects on the validation split: the members' dataset needs val_fraction > 0"
        )
    base = {}
    for tag, model in (("a", model_a), ("b", model_b)):
        for split, part in (("val", data.val), ("test", data.test)):
            base[f"{split}_loss_{tag}"], base[f"{split}_accuracy_{tag}"] = evaluate_model(
                model, part, s.eval_batch_size
            )
    mean_acc = (base["test_accuracy_a"] + base["test_accuracy_b"]) / 2
    mean_loss = (base["test_loss_a"] + base["test_loss_b"]) / 2
    per_type = {}
    for label, spec in types.items():
        spec = dict(spec)
        per_type[label] = (
            spec,
            StitchSettings.from_dict({**(settings or {}), **spec.pop("settings", {})}),
        )
    rows = []
    for layer in select_layers(model_a, layers):
        for label, (spec, st) in per_type.items():
            res = stitch_layer_pair(model_a, model_b, layer.name, data, spec, st, seed)
            res.pop("history")
            rows.append(
                {
                    "a": str(member_a),
                    "b": str(member_b),
                    "layer": layer.name,
                    "position": layer.position,
                    "label": layer.label,
                    "stitch": label,
                    **base,
                    "mean_test_accuracy": mean_acc,
                    "penalty": mean_acc - res["test_accuracy"],
                    "loss_penalty": res["test_loss"] - mean_loss,
                    **res,
                    "settings": json.dumps(asdict(st), sort_keys=True),
                }
            )
    return pd.DataFrame(rows)
