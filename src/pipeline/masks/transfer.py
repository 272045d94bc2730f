"""Transfer across permuted inputs: which weights does each new permutation reuse?

The paper's permuted-MNIST experiment, for any dataset and model. Permutation ``t`` (inputs
permuted by :func:`pipeline.data.tasks.pixel_permutation`, ``t = 0`` the identity) trains the
network's weights *and* a mask together (one Adam at the mask learning rate, gradient norm
clipped jointly), starting from:

- *used* weights: the union of the binary masks of permutations ``< t``. They keep their values
  and get no gradient (so every earlier permutation's function survives exactly: its mask only
  selects used weights);
- every other weight re-initialised (a fresh initialisation drawn from ``(seed, t)``);
- mask logits at ``used_init`` for used weights and ``new_init`` for new ones (paper: 2 and
  {2, 0, -1});
- with ``reset_first_layer`` the input layer counts as never used (a new permutation makes its
  old weights meaningless).

Biases are always masked here (the paper asserts it), so they are frozen with their weights;
parameters that carry no mask (BatchNorm affine) train during permutation 0 only. The metric is
the transfer sharing ``|m_t & used| / |m_t|`` (:func:`pipeline.masks.overlap.transfer_sharing`).
"""

from __future__ import annotations

from dataclasses import replace

import pandas as pd
import torch

from pipeline import seeding
from pipeline.masks.evaluate import score
from pipeline.masks.layers import masked_layers, masked_params
from pipeline.masks.overlap import transfer_sharing
from pipeline.masks.sampling import binary
from pipeline.masks.train import MaskHparams, MaskTask
from pipeline.masks.views import subtask_view
from pipeline.train.engine import Engine
from pipeline.train.optim import Adam


def permuted_transfer(
    build_model,
    splits,
    dataset: str,
    permutations: int,
    h: MaskHparams,
    seed: int = 0,
    used_init: float = 2.0,
    new_init: float = 2.0,
    reset_first_layer: bool = True,
):
    """Train ``permutations`` masks in sequence; ``build_model(init_seed)`` returns a freshly
    initialised model. Returns ``(masks, accuracy, sharing)``: the binary mask of each
    ``permuted_<t>``; rows ``(trained, evaluated, accuracy)`` (every permutation ``<= t`` on the
    test split after training ``t``); the transfer-sharing table."""
    h = replace(h, biases=True)
    model = build_model(seeding.derive(seed, "transfer-init", 0)).eval()
    layers = masked_layers(model, splits.input_shape, biases=True)
    names = masked_params(layers)
    first = {p for layer in layers if layer.role == "input" for p in layer.params}
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    masks: dict[str, dict] = {}
    rows = []
    for t in range(permutations):
        stage = f"permuted_{t}"
        used = {n: torch.zeros_like(weights[n], dtype=torch.bool) for n in names}
        for m in masks.values():
            used = {n: used[n] | m[n] for n in names}
        if reset_first_layer:
            used = {n: (torch.zeros_like(u) if n in first else u) for n, u in used.items()}
        if t:
            fresh = dict(build_model(seeding.derive(seed, "transfer-init", t)).named_parameters())
            weights = {
                n: torch.where(used[n], w, fresh[n].detach()) if n in used else w
                for n, w in weights.items()
            }
        view = subtask_view(splits, dataset, stage)
        weights, logits = _train_permutation(
            model,
            weights,
            used,
            view,
            h,
            t == 0,
            used_init,
            new_init,
            seeding.derive(seed, "transfer", t),
        )
        masks[stage] = binary(logits)
        final = {n: w.detach() for n, w in weights.items()}
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(final[n])
        for s in range(t + 1):
            test = subtask_view(splits, dataset, f"permuted_{s}", "test")
            rows.append(
                {
                    "trained": t,
                    "evaluated": s,
                    "accuracy": score(model, masks[f"permuted_{s}"], test)["accuracy"],
                }
            )
        weights = final
    sharing = transfer_sharing(masks, layers) if permutations > 1 else pd.DataFrame()
    return masks, pd.DataFrame(rows), sharing


class _FreezeUsed:
    """Engine callback: no gradient reaches the used weights (they keep their values)."""

    def __init__(self, trainable: dict, used: dict):
        self.trainable, self.used = trainable, used

    def before_update(self, run) -> None:
        for n, u in self.used.items():
            if self.trainable[n].grad is not None:
                self.trainable[n].grad.masked_fill_(u, 0.0)


def _train_permutation(
    model,
    weights,
    used,
    view,
    h: MaskHparams,
    first_stage: bool,
    used_init: float,
    new_init: float,
    seed: int,
):
    """Weights and mask logits of one permutation, trained together (a :class:`MaskTask` whose
    clipped and stepped parameters are both; the used weights frozen by :class:`_FreezeUsed`)."""
    trainable = {n: w.clone().requires_grad_(n in used or first_stage) for n, w in weights.items()}
    logits = {
        n: torch.where(u, used_init, new_init).to(weights[n].dtype).requires_grad_(True)
        for n, u in used.items()
    }
    params = [w for w in trainable.values() if w.requires_grad] + list(logits.values())
    opt = Adam(params, lr=h.lr)
    noise = seeding.generator(seed, "mask-noise", device=next(iter(weights.values())).device)
    where = f"transfer on {view.name!r}"
    task = MaskTask(model, trainable, logits, opt, params, h, noise, view, seed, where)
    Engine(task, 1, callbacks=(_FreezeUsed(trainable, used),), where=where).run()
    return {n: w.detach() for n, w in trainable.items()}, {n: l.detach() for n, l in logits.items()}
