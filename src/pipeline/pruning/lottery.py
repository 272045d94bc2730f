"""Levels of prune -> rewind -> retrain (lottery tickets), for any trainer.

Level 0 trains from the initialisation ``theta_0`` with every weight present and records the
weights after ``rewind_step`` updates (``theta_k``; ``k = 0``: the initialisation). Level ``L >=
1`` prunes the previous level's trained weights (:func:`pipeline.train.pruning.prune`) and
retrains the masked network from

- ``theta_k * mask`` (``sparse_global``, ``fc19``: rewinding), training steps ``k .. end`` (the
  same batch order an unpruned run would see there; a fresh optimizer), or
- the previous level's trained weights ``* mask`` (``han``: no rewinding), all steps again.

Masked weights are zero and stay zero: gradients are masked before every optimizer step and
weights after it, so Adam's moments of pruned weights stay zero too
(:class:`pipeline.train.pruning.PruningMasks`, a callback of the training engine).

:func:`run_lottery` does this for an ordinary pipeline run (its ``hparams``: model, dataset,
train sections) with an engine task that, unmasked, takes exactly the steps of
:func:`pipeline.train.loop.train_run` (same initialisation, batches and optimizer), so ``theta_k``
equals that run's checkpoint at step ``k``. Outputs in ``out_dir``: ``level~{L}/mask.pt`` and
``level~{L}/final.pt`` per level, ``rewind.pt``, ``lottery.parquet`` (one row per level:
strategy, level, sparsity, remaining, train/val/test loss and accuracy). Finished levels are
skipped on a re-run (each level's files are written atomically).
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch

from pipeline import devices, io, seeding
from pipeline.config import TrainHparams, run_fingerprint
from pipeline.train.pruning import (
    LotteryHparams,
    PruningMasks,
    lottery,
    prunable_names,
    sparsity,
)


# -- ordinary pipeline runs ---------------------------------------------------------------------
class _Snapshot:
    """Engine callback: the model's state after ``step`` updates (after the masks callback's
    weight masking: list it after :class:`PruningMasks`); ``None`` if the run never is there."""

    def __init__(self, model, step: int | None):
        self.model, self.step, self.state = model, step, None

    def on_start(self, run) -> None:
        if run.step == self.step:
            self.state = _copy(self.model)

    def after_update(self, run, out) -> None:
        if run.step + 1 == self.step:  # the engine counts this update after after_update
            self.state = _copy(self.model)


def train_masked(
    hparams: dict,
    state: dict,
    mask: dict,
    start_step: int = 0,
    keep_step: int | None = None,
    device: str = "cpu",
    data_dir: str = "data",
    data=None,
):
    """Train the run's model from ``state`` with ``mask`` fixed (:class:`PruningMasks`), from
    step ``start_step`` to ``epochs x steps per epoch``, on the engine (no resume state: a
    level is the unit of resumption): ``(final_state, state after keep_step steps, metrics)``."""
    from pipeline.train.engine import Engine
    from pipeline.train.loop import RunStep
    from pipeline.train.optim import Schedule, evaluate, loss_fn, make_optimizer
    from pipeline.train.setup import placed_data, run_model

    h = TrainHparams(**hparams["train"])
    if h.schedule == "plateau":
        raise ValueError(
            "lottery: train.schedule plateau depends on the evaluation history; "
            "use constant, step or multistep"
        )
    seed = hparams["seed"]
    if data is None:
        dev, dtype, data = placed_data(hparams, device, data_dir)
    else:
        dev, dtype = devices.resolve(device), devices.dtype(h.dtype, "train.dtype")
    model = run_model(hparams, data, seed, dtype, dev)
    model.load_state_dict(state)
    model.train()
    masks = PruningMasks(dict(model.named_parameters()), mask)
    optimizer = make_optimizer(model.named_parameters(), h)
    sched = Schedule(h)
    loss = loss_fn(h.loss)
    task = RunStep(model, optimizer, sched, loss, data, h, seed, dev)
    per_epoch = task.steps_per_epoch
    epoch, batch = divmod(start_step, per_epoch) if per_epoch else (0, 0)
    for e in range(epoch):  # the schedule fast-forwarded to the start
        sched.end_epoch(e, {})
    Schedule.apply(optimizer, sched.lr)
    kept = _Snapshot(model, keep_step)
    run = Engine(
        task,
        h.epochs,
        callbacks=(masks, kept),
        # dropout & co.: as train_run from step 0; a rewound level draws its own stream
        rng_seed=seeding.derive(seed, "train")
        if start_step == 0
        else seeding.derive(seed, "train", "from-step", start_step),
        where="lottery level",
        start=(epoch, batch, start_step),
    ).run()
    metrics = {"steps": run.step}
    splits = {"train": data.train, **data.eval_splits()}
    for split, part in splits.items():
        metrics[f"{split}_loss"], metrics[f"{split}_accuracy"] = evaluate(
            model, part, loss, h.eval_batch_size
        )
    return _copy(model), kept.state, metrics


def _copy(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def run_lottery(
    out_dir,
    hparams: dict,
    h: LotteryHparams,
    device: str = "cpu",
    data_dir: str = "data",
    threads: int = 1,
) -> pd.DataFrame:
    """Lottery levels for the run described by ``hparams`` (as
    :func:`pipeline.train.loop.train_run` takes them); writes the files listed in the module
    docstring and returns the level table."""
    from pipeline.models import neuron_structure
    from pipeline.train.setup import placed_data, run_model

    torch.set_num_threads(threads)
    out = Path(out_dir)
    _, dtype, data = placed_data(hparams, device, data_dir)
    model = run_model(hparams, data, hparams["seed"], dtype, "cpu")  # theta_0, kept on the host
    state0 = _copy(model)
    output = _output_weight(model, data.input_shape, neuron_structure)
    exclude = () if (h.prune_output or h.strategy == "fc19") else (output,)
    names = prunable_names(dict(model.named_parameters()), exclude=exclude)
    key = run_fingerprint({**hparams, "lottery": asdict(h)})
    done = _finished_levels(out, key, h)

    def train_level(start, mask, level, step):
        keep = h.rewind_step if level == 0 else None
        return train_masked(hparams, start, mask, step, keep, device, data_dir, data)

    rows = []
    for level, mask, final, metrics in lottery(train_level, state0, names, output, h, done=done):
        if level not in done:
            if level == 0:
                io.save_torch(
                    out / "rewind.pt",
                    {"model": metrics["_rewind"], "step": h.rewind_step, "fingerprint": key},
                )
            io.save_torch(out / f"level~{level}" / "mask.pt", {"mask": mask})
            io.save_torch(
                out / f"level~{level}" / "final.pt",
                {
                    "model": final,
                    "fingerprint": key,
                    "metrics": {k: v for k, v in metrics.items() if k != "_rewind"},
                },
            )
        rows.append(
            {
                "strategy": h.strategy,
                "level": level,
                "sparsity": sparsity(mask),
                "remaining": int(sum(int(m.sum()) for m in mask.values())),
                **{k: v for k, v in metrics.items() if k != "_rewind"},
            }
        )
    table = pd.DataFrame(rows)
    io.write_parquet(out / "lottery.parquet", table)
    return table


def _output_weight(model, input_shape, neuron_structure) -> str | None:
    from pipeline.models.structure import StructureError

    try:
        out = neuron_structure(model, input_shape).output
    except StructureError:
        return None
    return out.weight if out is not None else None


def _finished_levels(out: Path, key: str, h: LotteryHparams) -> dict:
    done = {}
    for level in range(h.levels + 1):
        folder = out / f"level~{level}"
        final_path, mask_path = folder / "final.pt", folder / "mask.pt"
        if not (final_path.is_file() and mask_path.is_file()):
            break
        final = io.load_torch(final_path)
        if final.get("fingerprint") != key:
            break
        metrics = dict(final["metrics"])
        if level == 0:
            rewind = out / "rewind.pt"
            if not rewind.is_file():
                break
            metrics["_rewind"] = io.load_torch(rewind)["model"]
        done[level] = (io.load_torch(mask_path)["mask"], final["model"], metrics)
    return done
