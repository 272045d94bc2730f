"""The per-step mechanics trace: raw per-neuron reductions of gradients and updates.

For every optimizer step ``k`` (the update from theta_k to theta_{k+1}) it records, for every
part of the neuron structure (:func:`pipeline.models.reductions.parts`):

- ``g2[k]``: per-neuron sum of squares of the raw minibatch gradient g_k (no weight decay);
- ``u2[k]``: the same of the update direction: the velocity v_{k+1} under momentum, g_k + wd
  theta_k under plain SGD, and (theta_k - theta_{k+1}) / lr for any other optimizer;
- ``colsum[k]``: column sums (over classes) of the logit layer's gradient [dW | db].

These numbers do not depend on any metric, so editing a metric never re-runs training. Rows are
kept on the device and moved to the host when the training loop flushes a segment.

Each reduction flattens the tensors into one vector and runs a
:class:`~pipeline.models.part_plan.PartSumsq` planned once for the model: a few batched
operations per step instead of several per slice, with the numbers of
:func:`~pipeline.models.reductions.part_sumsq` bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch

from pipeline.models.part_plan import PartSumsq
from pipeline.models.reductions import column_sums, parts
from pipeline.models.structure import NeuronStructure
from pipeline.train.optim import decayed


class MechanicsTrace:
    def __init__(self, model: torch.nn.Module, structure: NeuronStructure, optimizer, h):
        self.parts = parts(structure)
        self.output = structure.output
        self.named = dict(model.named_parameters())
        self.params = list(self.named.values())
        self.optimizer = optimizer
        self.kind = (
            "velocity"
            if h.optimizer == "sgd" and h.momentum > 0
            else ("sgd" if h.optimizer == "sgd" else "delta")
        )
        out = structure.output
        # the column sums ride along with the gradient's reduction (contiguous weights only)
        columns = (
            (out.weight, out.bias or None)
            if out is not None
            and all(self.named[n].is_contiguous() for n in (out.weight, out.bias) if n)
            else None
        )
        self._separate = out is not None and columns is None
        self.plan_g = PartSumsq(self.parts, self.named, columns)  # g2 (and colsum)
        self.plan_u = PartSumsq(self.parts, self.named)  # u2
        # weight decay of the sgd update g + wd theta: per entry 1 (decayed) or 0 (not)
        names = list(self.named)
        self.wd = h.wd
        decay = [decayed(n, h.wd_on) for n in names]
        self._decay = (
            None
            if all(decay)
            else torch.cat(
                [
                    torch.full((p.numel(),), float(d), dtype=p.dtype, device=p.device)
                    for d, p in zip(decay, self.params, strict=True)
                ]
            )
        )
        self._zeros: dict[int, torch.Tensor] = {}
        self.rows: dict[str, list] = {"g": [], "u2": [], "colsum": []}
        self._before = torch.empty_like(self.plan_u.flat) if self.kind == "delta" else None

    def layout(self) -> list[dict]:
        """Column layout of ``g2``/``u2``: one entry per part with its offset."""
        out, offset = [], 0
        for p in self.parts:
            out.append({"key": p.key, "group": p.group, "offset": offset, "size": p.size})
            offset += p.size
        return out

    def _zero(self, i: int) -> torch.Tensor:
        """Zeros shaped like parameter ``i`` (a missing gradient or velocity; never written)."""
        if i not in self._zeros:
            self._zeros[i] = torch.zeros_like(self.params[i])
        return self._zeros[i]

    @torch.no_grad()
    def before_step(self) -> None:
        grads = [p.grad if p.grad is not None else self._zero(i) for i, p in enumerate(self.params)]
        self.rows["g"].append(self.plan_g(grads))  # [g2 | colsum]
        self.plan_g.forget()
        if self._separate:
            w, b = self.output.weight, self.output.bias
            self.rows["colsum"].append(
                column_sums(self.named[w].grad, self.named[b].grad if b else None)
            )
        if self.kind == "sgd":  # u = g + wd theta (wd 0 where not decayed)
            u = self.plan_u.load(self.params)
            if self._decay is not None:
                u.mul_(self._decay)
            u.mul_(self.wd).add_(self.plan_g.flat)
            self.rows["u2"].append(self.plan_u())
        elif self.kind == "delta":
            self.plan_u.load(self.params, out=self._before)

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        if self.kind == "velocity":
            state = self.optimizer.state
            vel = [
                state[p]["momentum_buffer"] if "momentum_buffer" in state[p] else self._zero(i)
                for i, p in enumerate(self.params)
            ]
            self.rows["u2"].append(self.plan_u(vel))
        elif self.kind == "delta":  # u = (theta_k - theta_{k+1}) / lr
            u = self.plan_u.load(self.params)
            torch.sub(self._before, u, out=u).div_(lr)
            self.rows["u2"].append(self.plan_u())

    # engine hooks (:mod:`pipeline.train.engine`): the trace is a callback of the run's loop
    def before_update(self, run) -> None:
        self.before_step()

    def after_update(self, run, out) -> None:
        self.after_step(run.task.lr)

    def flush(self) -> dict[str, np.ndarray]:
        """The rows since the last flush, as host arrays ``[steps, columns]``."""
        out = {}
        if self.rows["g"]:
            g = torch.stack(self.rows["g"]).cpu().numpy()
            out["g2"] = np.ascontiguousarray(g[:, : self.plan_g.size])
        for key in ("u2", "colsum"):
            if self.rows[key]:
                out[key] = torch.stack(self.rows[key]).cpu().numpy()
        if self.rows["g"] and self.plan_g.columns:
            out["colsum"] = np.ascontiguousarray(g[:, self.plan_g.size :])
        for rows in self.rows.values():
            rows.clear()
        return out
