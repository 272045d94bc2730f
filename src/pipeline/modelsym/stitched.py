"""The stitched network: bottom model up to a layer, a stitching layer, top model after it.

Both models are traced with torch.fx (same architecture, hence the same graph). The stitched
graph runs the nodes in execution order; every module call up to and including the stitch
layer ``l`` uses the *bottom* model's module, ``l``'s output goes through the stitching layer
``S``, and every later module call uses the *top* model's module. So a ReLU inside a residual
block stitches the block's remaining branch into the top model while the identity path still
carries the bottom model's stream (what Godfrey et al.'s pre-order construction does).

Only ``S`` trains: both models are frozen copies. BatchNorm handling is explicit
(``bn_mode``):

- ``eval``: the frozen models stay in eval mode (their own running statistics; the top model's
  BN layers use the top model's statistics). Clean: the bottom is a fixed feature extractor.
- ``train``: Godfrey et al.'s behaviour: the frozen models normalise with batch statistics while
  ``S`` trains, and before every evaluation a no-grad pass over the training data re-estimates
  every BN's statistics with ``S`` in eval mode (its evaluated map, e.g. the rounded
  permutation), see :func:`reestimate_stitched`. The pass resets the statistics and takes the
  cumulative average (the original code ran it with BN's momentum from the current values);
  training then goes on from the statistics it had before the pass.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.fx import Graph, GraphModule

from pipeline.modelsym.probes import LayerError, trace

BN_MODES = ("eval", "train")


def _signature(gm: GraphModule) -> list[tuple]:
    return [(n.name, n.op, str(n.target)) for n in gm.graph.nodes]


def _frozen(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_stitched(
    bottom: nn.Module, top: nn.Module, layer: str, stitch: nn.Module, bn_mode: str = "eval"
) -> GraphModule:
    """The stitched model (frozen copies of ``bottom`` and ``top``; ``stitch`` is shared).

    Submodules: ``bottom.*`` (calls up to ``layer``), ``top.*`` (calls after), ``stitch``.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode: {bn_mode!r} not allowed; allowed: {', '.join(BN_MODES)}")
    ga, gb = trace(bottom), trace(top)
    if _signature(ga) != _signature(gb):
        raise ValueError(
            "stitching needs two models of the same architecture (their forward graphs differ)"
        )
    names = [n.name for n in ga.graph.nodes]
    if layer not in names:
        raise LayerError(
            f"stitch layer {layer!r} is not a node of the model's graph; nodes: " + ", ".join(names)
        )
    root = nn.Module()
    root.bottom, root.top, root.stitch = _frozen(bottom), _frozen(top), stitch
    graph = Graph()
    env: dict = {}
    after = False
    for node in ga.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        if node.op in ("call_module", "get_attr"):
            new.target = f"{'top' if after else 'bottom'}.{node.target}"
        env[node] = new
        if node.name == layer:
            env[node] = graph.call_module("stitch", (new,))
            after = True
    gm = GraphModule(root, graph)
    gm.bn_mode = bn_mode
    set_training(gm, False)
    return gm


def set_training(gm: GraphModule, training: bool) -> None:
    """Train or eval mode for ``S``; the frozen models follow ``bn_mode`` while training."""
    gm.train(training and gm.bn_mode == "train")
    gm.stitch.train(training)


def has_batch_norm(gm: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in gm.modules())


@torch.no_grad()
def reestimate_stitched(gm: GraphModule, batches) -> None:
    """Re-estimate every BatchNorm statistic of the stitched model over ``batches`` (inputs),
    frozen models in train mode and ``S`` in eval mode; ends in eval mode."""
    from pipeline.modelsym.matching import reestimate_bn

    reestimate_bn(gm, batches, eval_modules=(gm.stitch,))
    set_training(gm, False)


def layer_channels(model: nn.Module, layer: str, x: torch.Tensor) -> int:
    """Channels (axis 1) of ``model``'s output at node ``layer`` on example inputs ``x``."""
    from pipeline.modelsym.probes import feature_extractor

    was = model.training
    model.eval()
    with torch.no_grad():
        _, feats = feature_extractor(model, [layer])(x[:2])
    model.train(was)
    return feats[layer].shape[1]
