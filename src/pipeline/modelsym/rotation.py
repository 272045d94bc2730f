"""The rotation/projection control (Godfrey et al., Sec. 4): is the next layer able to absorb a
fixed change of basis inserted below its activation?

For a trained member and each of its Linear/Conv layers but the last, insert a fixed matrix
``T`` right after that layer (before its normalisation/activation): ``z -> T z`` on channels.
Everything up to and including that layer is frozen (eval mode); every module called after it
retrains from its trained weights. ``T`` is

- ``grelu``: ``P diag(lambda)``, ``P`` a random permutation, ``lambda_i = exp(sigma z_i -
  sigma^2 / 2)`` log-normal with mean 1: ReLU(P D z) = P D ReLU(z), so the next layer can
  absorb it exactly;
- ``orthogonal``: a Haar-random orthogonal matrix (QR of a Gaussian, signs fixed), which it
  cannot;
- ``identity``: the control for continued training alone.

Rotation penalty = the member's test accuracy - the retrained model's test accuracy (the
retrained state selected by validation accuracy, epoch 0 included).
"""

from __future__ import annotations

import copy
import json

import pandas as pd
import torch
import torch.nn as nn
from torch.fx import GraphModule

from pipeline import seeding
from pipeline.modelsym.matching import evaluate_model
from pipeline.modelsym.probes import LayerError, trace
from pipeline.modelsym.stitch_layers import apply_channels
from pipeline.train.engine import Engine
from pipeline.train.optim import SGD, Adam, multi_head_ce

GROUPS = ("grelu", "orthogonal", "identity")


class FixedMap(nn.Module):
    """``x -> T x`` on axis 1 with a fixed (buffer) ``T``."""

    def __init__(self, matrix: torch.Tensor):
        super().__init__()
        self.register_buffer("matrix", matrix)

    def forward(self, x):
        return apply_channels(self.matrix, x)


def random_transform(
    group: str, n: int, gen: torch.Generator, sigma: float = 1.0, dtype=torch.float64
) -> torch.Tensor:
    """A random ``n x n`` element of ``group`` (grelu, orthogonal or identity)."""
    if group == "identity":
        return torch.eye(n, dtype=dtype)
    if group == "orthogonal":
        q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
        return (q * torch.sign(torch.diagonal(r))[None, :]).to(dtype)
    if group == "grelu":
        z = torch.randn(n, generator=gen, dtype=torch.float64)
        scales = torch.exp(sigma * z - sigma**2 / 2)
        t = torch.zeros(n, n, dtype=torch.float64)
        t[torch.arange(n), torch.randperm(n, generator=gen)] = scales
        return t.to(dtype)
    raise ValueError(f"rotation group {group!r} not allowed; allowed: {', '.join(GROUPS)}")


def linear_layers(model: nn.Module) -> list[str]:
    """Node names of the Linear/Conv calls, in execution order, without the last (the logits)."""
    gm = trace(model)
    modules = dict(gm.named_modules())
    names = [
        n.name
        for n in gm.graph.nodes
        if n.op == "call_module"
        and isinstance(modules[n.target], nn.Linear | nn.Conv1d | nn.Conv2d | nn.Conv3d)
    ]
    return names[:-1]


def insert_transform(model: nn.Module, layer: str, matrix: torch.Tensor) -> GraphModule:
    """A copy of ``model`` with ``T`` after node ``layer``; the modules called up to ``layer`` are
    frozen (``requires_grad`` off; listed in ``gm.frozen``)."""
    gm = trace(copy.deepcopy(model))
    nodes = {n.name: n for n in gm.graph.nodes}
    if layer not in nodes:
        raise LayerError(f"rotation layer {layer!r} is not a node of the model's graph")
    gm.add_submodule("transform", FixedMap(matrix))
    node = nodes[layer]
    with gm.graph.inserting_after(node):
        new = gm.graph.call_module("transform", (node,))
    node.replace_all_uses_with(new, delete_user_cb=lambda user: user is not new)
    gm.graph.lint()
    gm.recompile()
    frozen, before = [], True
    for n in gm.graph.nodes:
        if n.op == "call_module" and before and n.target != "transform":
            frozen.append(n.target)
        if n is node:
            before = False
    gm.frozen = frozen
    for name in frozen:
        for p in gm.get_submodule(name).parameters():
            p.requires_grad_(False)
    return gm


def _set_training(gm: GraphModule, training: bool) -> None:
    gm.train(training)
    for name in gm.frozen:
        gm.get_submodule(name).eval()


class RetrainTask:
    """The modules above the fixed map, retrained (an engine task,
    :class:`pipeline.train.engine.Task`): per batch the multi-head cross-entropy of ``gm``
    (frozen modules in eval mode) and one optimizer step on the unfrozen parameters; per epoch
    the validation loss/accuracy, keeping the state of the best validation accuracy (first of
    equals; ``best``, epoch 0 = before retraining). No resume state: the control is short and
    restarts from the member."""

    def __init__(self, gm: GraphModule, data, lr, optimizer, wd, batch_size, seed, eval_batch_size):
        self.gm, self.data, self.batch_size, self.seed = gm, data, batch_size, seed
        self.eval_batch_size = eval_batch_size
        params = [p for p in gm.parameters() if p.requires_grad]
        if optimizer == "adam":
            self.opt = Adam(params, lr=lr, weight_decay=wd)
        elif optimizer == "sgd":
            self.opt = SGD(params, lr=lr, momentum=0.9, weight_decay=wd)
        else:
            raise ValueError(f"rotation optimizer {optimizer!r} not allowed; allowed: adam, sgd")
        self.steps_per_epoch = data.train.num_batches(batch_size, True)
        self.best = {**self._scored(0), "state": copy.deepcopy(gm.state_dict())}

    def _scored(self, epoch: int) -> dict:
        val_loss, val_acc = evaluate_model(self.gm, self.data.val, self.eval_batch_size)
        return {"val_accuracy": val_acc, "val_loss": val_loss, "epoch": epoch}

    def batches(self, epoch: int, start: int):
        _set_training(self.gm, True)
        return self.data.train.train_batches(self.batch_size, True, self.seed, epoch, start)

    def forward_backward(self, batch) -> torch.Tensor:
        x, y = batch
        self.opt.zero_grad(set_to_none=True)
        loss = multi_head_ce(self.gm(x), y)
        loss.backward()
        return loss

    def update(self) -> None:
        self.opt.step()

    def end_epoch(self, epoch: int) -> dict:
        scored = self._scored(epoch + 1)
        if scored["val_accuracy"] > self.best["val_accuracy"]:
            self.best = {**scored, "state": copy.deepcopy(self.gm.state_dict())}
        return {k: scored[k] for k in ("val_loss", "val_accuracy")}


def retrain_above(
    gm: GraphModule,
    data,
    epochs: int,
    lr: float,
    optimizer: str,
    wd: float,
    batch_size: int,
    seed: int,
    eval_batch_size: int = 1024,
) -> dict:
    """Retrain the unfrozen parameters (:class:`RetrainTask` on the engine); the
    validation-best state's val/test metrics."""
    task = RetrainTask(gm, data, lr, optimizer, wd, batch_size, seed, eval_batch_size)
    # a train split smaller than one batch: no updates, the epoch-0 state stays the best
    Engine(task, epochs if task.steps_per_epoch else 0, where="rotation control").run()
    best = dict(task.best)
    gm.load_state_dict(best.pop("state"))
    test_loss, test_acc = evaluate_model(gm, data.test, eval_batch_size)
    return {**best, "test_loss": test_loss, "test_accuracy": test_acc}


def rotation_control(
    member,
    layers: list | None = None,
    groups=("grelu", "orthogonal"),
    repeats: int = 1,
    epochs: int = 5,
    lr: float = 1e-3,
    optimizer: str = "adam",
    wd: float = 0.0,
    batch_size: int = 64,
    sigma: float = 1.0,
    data_dir="data",
    device: str = "cpu",
    seed: int = 0,
) -> pd.DataFrame:
    """The rotation table of one member: a row per (layer, group, repeat)."""
    from pipeline import devices
    from pipeline.modelsym.members import load_member, member_data
    from pipeline.modelsym.probes import feature_extractor

    dev = devices.resolve(device)
    model, record = load_member(member, dev)
    dtype = next(model.parameters()).dtype
    data = member_data(record, data_dir, dev, dtype)
    if data.val is None or not len(data.val):
        raise ValueError(
            "the rotation control selects on the validation split: the member's "
            "dataset needs val_fraction > 0"
        )
    base_loss, base_acc = evaluate_model(model, data.test)
    example = next(data.train.eval_batches(2))[0]
    names = layers if layers is not None else linear_layers(model)
    rows = []
    for position, layer in enumerate(names):
        with torch.no_grad():
            n = feature_extractor(model, [layer])(example)[1][layer].shape[1]
        for group in groups:
            for r in range(repeats):
                gen = seeding.generator(seed, "rotation", layer, group, r)
                t = random_transform(group, n, gen, sigma, dtype).to(dev)
                gm = insert_transform(model, layer, t)
                init_loss, init_acc = evaluate_model(gm, data.test)
                res = retrain_above(
                    gm,
                    data,
                    epochs,
                    lr,
                    optimizer,
                    wd,
                    batch_size,
                    seeding.derive(seed, "rotation-train", layer, group, r),
                )
                rows.append(
                    {
                        "member": str(member),
                        "layer": layer,
                        "position": position,
                        "group": group,
                        "repeat": r,
                        "base_test_accuracy": base_acc,
                        "base_test_loss": base_loss,
                        "inserted_test_accuracy": init_acc,
                        **res,
                        "penalty": base_acc - res["test_accuracy"],
                        "settings": json.dumps(
                            {
                                "epochs": epochs,
                                "lr": lr,
                                "optimizer": optimizer,
                                "wd": wd,
                                "batch_size": batch_size,
                                "sigma": sigma,
                            }
                        ),
                    }
                )
    return pd.DataFrame(rows)
