"""The per-step mechanics trace: raw per-neuron reductions of gradients and updates.

For every optimizer step ``k`` (the update from theta_k to theta_{k+1}) it records, for every
part of the neuron structure (:func:`pipeline.models.reductions.parts`):

- ``g2[k]``: per-neuron sum of squares of the raw minibatch gradient g_k (no weight decay);
- ``u2[k]``: the same of the update direction: the velocity v_{k+1} under momentum, g_k + wd
  theta_k under plain SGD, and (theta_k - theta_{k+1}) / lr for any other optimizer;
- ``colsum[k]``: column sums (over classes) of the logit layer's gradient [dW | db].

These numbers do not depend on any metric, so editing a metric never re-runs training. Rows are
kept on the device and moved to the host when the training loop flushes a segment.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models.reductions import column_sums, part_sumsq, parts
from pipeline.models.structure import NeuronStructure
from pipeline.train.optim import decayed


class MechanicsTrace:
    def __init__(self, model: torch.nn.Module, structure: NeuronStructure, optimizer, h):
        self.parts = parts(structure)
        self.output = structure.output
        self.named = dict(model.named_parameters())
        self.optimizer = optimizer
        self.kind = (
            "velocity"
            if h.optimizer == "sgd" and h.momentum > 0
            else ("sgd" if h.optimizer == "sgd" else "delta")
        )
        self.wd = {n: h.wd if decayed(n, h.wd_on) else 0.0 for n in self.named}
        self.rows: dict[str, list] = {"g2": [], "u2": [], "colsum": []}
        self._before: dict | None = None

    def layout(self) -> list[dict]:
        """Column layout of ``g2``/``u2``: one entry per part with its offset."""
        out, offset = [], 0
        for p in self.parts:
            out.append({"key": p.key, "group": p.group, "offset": offset, "size": p.size})
            offset += p.size
        return out

    def _reduce(self, tensors: dict) -> torch.Tensor:
        if not self.parts:  # no hidden neurons (logistic regression): zero columns
            return next(iter(tensors.values())).new_zeros(0)
        return torch.cat([part_sumsq(tensors, p) for p in self.parts])

    @torch.no_grad()
    def before_step(self) -> None:
        grads = {
            n: (p.grad if p.grad is not None else torch.zeros_like(p))
            for n, p in self.named.items()
        }
        self.rows["g2"].append(self._reduce(grads))
        if self.output is not None:
            w = grads[self.output.weight]
            b = grads[self.output.bias] if self.output.bias else None
            self.rows["colsum"].append(column_sums(w, b))
        if self.kind == "sgd":
            self.rows["u2"].append(
                self._reduce({n: g + self.wd[n] * self.named[n] for n, g in grads.items()})
            )
        elif self.kind == "delta":
            self._before = {n: p.detach().clone() for n, p in self.named.items()}

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        if self.kind == "velocity":
            state = self.optimizer.state
            vel = {
                n: state[p]["momentum_buffer"]
                if "momentum_buffer" in state[p]
                else torch.zeros_like(p)
                for n, p in self.named.items()
            }
            self.rows["u2"].append(self._reduce(vel))
        elif self.kind == "delta":
            self.rows["u2"].append(
                self._reduce({n: (self._before[n] - p) / lr for n, p in self.named.items()})
            )
            self._before = None

    def flush(self) -> dict[str, np.ndarray]:
        """The rows since the last flush, as host arrays ``[steps, columns]``."""
        out = {}
        for key, rows in self.rows.items():
            if rows:
                out[key] = torch.stack(rows).cpu().numpy()
            rows.clear()
        return out
