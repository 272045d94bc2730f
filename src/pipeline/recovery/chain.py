"""Fully connected chains (MLPs) as stacked parameters: N same-shape networks in one tensor program.

A :class:`Chain` is ``x -> act(W_1 x + b_1) -> ... -> act(W_L h + b_L) -> W_out h + b_out``
(plus, optionally, linear *skips*: Linear ``j`` in ``skips`` (1-based over the layers after the
first) also reads the input of Linear ``j - 1``, ``z_j = W_j h_j + S_j h_{j-1} + b_j``, weight
``skip.<name>.weight [fan_out, fan_in(j - 1)]``: the affine correction of Expand-and-Cluster for
activations whose sign flip leaves a linear term, ``sigma(-z) = sigma(z) - z``, which lives in
the flipped neuron's own input space). Its other parameter names are those of the registered
``mlp`` model (``fc1.weight [w_1, d]``, ..., ``out.bias [o]``), so a stacked parameter dict
``{name: [N, *shape]}`` without skips holds N ``mlp`` state dicts.

:func:`chain_of` reads a chain from a model's neuron structure (one branch per group, no
normalisation, each group read by the next Linear only) and refuses anything else.

Stacked forward: ``x [B, d]`` (shared by all N) or ``[N, B, d]`` -> ``[N, B, o]``; the first
layer is one GEMM over all N networks' neurons, later layers batched matmuls.
:class:`StackedMSE` is the per-network mean squared error of a flat ``[N, P]`` buffer with its
gradient derived by hand (backpropagation as batched matmuls, no autograd graph), the step of
the students' fit.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from pipeline.models.activations import backward as activation_backward
from pipeline.models.activations import make as make_activation
from pipeline.models.structure import NeuronStructure


@dataclass(frozen=True)
class Chain:
    input_dim: int
    widths: tuple[int, ...]
    outputs: int
    activation: str = "relu"
    bias: bool = True
    skips: tuple[int, ...] = ()  # Linear indices (1..depth) that also read the layer below's input
    layers: tuple[str, ...] = ()  # Linear names, hidden then output; default fc1..fcL, out

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "skips", tuple(sorted({int(j) for j in self.skips})))
        if any(not 1 <= j <= len(self.widths) for j in self.skips):
            raise ValueError(f"chain: skips {self.skips} outside 1..{len(self.widths)}")
        if not self.layers:
            names = tuple(f"fc{i}" for i in range(1, len(self.widths) + 1)) + ("out",)
            object.__setattr__(self, "layers", names)
        if len(self.layers) != len(self.widths) + 1:
            raise ValueError(
                f"chain: {len(self.layers)} layer names for {len(self.widths)} "
                "hidden widths plus the output"
            )
        make_activation(self.activation)  # clear error for an unknown name

    @property
    def depth(self) -> int:
        return len(self.widths)

    def fan_in(self, layer: int) -> int:
        """Inputs of Linear number ``layer`` (0-based; ``depth`` is the output layer)."""
        return self.input_dim if layer == 0 else self.widths[layer - 1]

    def fan_out(self, layer: int) -> int:
        return self.outputs if layer == self.depth else self.widths[layer]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out = {}
        for i, name in enumerate(self.layers):
            out[f"{name}.weight"] = (self.fan_out(i), self.fan_in(i))
            if self.bias:
                out[f"{name}.bias"] = (self.fan_out(i),)
        for j in self.skips:
            out[skip_name(self, j)] = (self.fan_out(j), self.fan_in(j - 1))
        return out

    def with_widths(self, widths) -> Chain:
        return replace(self, widths=tuple(widths))

    def with_skips(self, skips) -> Chain:
        return replace(self, skips=tuple(skips))

    def model_options(self) -> dict:
        """Options of the registered ``mlp`` model with this architecture (no skip)."""
        return {"widths": list(self.widths), "activation": self.activation, "bias": self.bias}


def chain_of(structure: NeuronStructure, input_dim: int) -> Chain:
    """The chain a model's neuron structure describes; ``ValueError`` if it is not a plain MLP."""
    groups = structure.groups
    if structure.output is None or not groups:
        raise ValueError("recovery needs a model with hidden layers and a Linear output layer")
    names, acts, bias = [], set(), None
    for i, g in enumerate(groups):
        if len(g.branches) != 1 or g.branches[0].norm or g.normalised_by or g.max_pool:
            raise ValueError(
                f"neuron group {g.name}: recovery needs plain Linear layers "
                "(no BatchNorm, residual joins or pooling)"
            )
        lin = g.branches[0].linear
        layer = lin[0].param.rsplit(".", 1)[0]
        if any(s.axis != 0 or s.start != 0 or s.block != 1 for s in lin):
            raise ValueError(f"neuron group {g.name}: not a Linear layer")
        nxt = (
            groups[i + 1].branches[0].linear[0].param
            if i + 1 < len(groups)
            else (structure.output.weight)
        )
        if len(g.outgoing) != 1 or g.outgoing[0].param != nxt or g.outgoing[0].block != 1:
            raise ValueError(f"neuron group {g.name}: must be read by the next Linear only")
        has_bias = len(lin) == 2
        if bias is not None and has_bias != bias:
            raise ValueError("recovery needs all layers with biases or all without")
        bias = has_bias
        names.append(layer)
        acts.add(g.activation)
    if len(acts) != 1:
        raise ValueError(f"recovery needs one activation for all hidden layers, found {acts}")
    out_layer = structure.output.weight.rsplit(".", 1)[0]
    if (structure.output.bias is not None) != bias:
        raise ValueError("recovery needs all layers with biases or all without")
    return Chain(
        input_dim,
        tuple(g.size for g in groups),
        structure.output.size,
        acts.pop(),
        bool(bias),
        (),
        (*names, out_layer),
    )


def skip_name(chain: Chain, j: int) -> str:
    """Parameter name of the skip into Linear ``j`` (from the input of Linear ``j - 1``)."""
    return f"skip.{chain.layers[j]}.weight"


# -- stacked parameters ---------------------------------------------------------------------------
def layout(chain: Chain) -> dict[str, tuple[int, tuple[int, ...]]]:
    """``name -> (offset, shape)`` of each parameter in the flat ``[N, P]`` buffer."""
    out, offset = {}, 0
    for name, shape in chain.shapes().items():
        out[name] = (offset, shape)
        offset += int(torch.Size(shape).numel())
    return out


def flatten(chain: Chain, params: dict) -> torch.Tensor:
    """Stacked dict ``{name: [N, *shape]}`` -> one ``[N, P]`` tensor (a copy)."""
    n = next(iter(params.values())).shape[0]
    return torch.cat([params[k].reshape(n, -1) for k in chain.shapes()], dim=1)


def unflatten(chain: Chain, flat: torch.Tensor) -> dict:
    """Views ``{name: [N, *shape]}`` into a flat ``[N, P]`` buffer (gradients flow to it)."""
    n = flat.shape[0]
    return {
        k: flat[:, o : o + int(torch.Size(s).numel())].view(n, *s)
        for k, (o, s) in layout(chain).items()
    }


def forward(chain: Chain, params: dict, x: torch.Tensor) -> torch.Tensor:
    """Outputs ``[N, B, o]`` of the N stacked networks for ``x [B, d]`` or ``[N, B, d]``."""
    return states(chain, params, x)[-1]


def _linear(h: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``h [B, i]`` (shared: one GEMM over every network's rows) or ``[N, B, i]`` times ``w [N,
    o, i]`` transposed: ``[N, B, o]``."""
    if h.dim() == 2:
        n = w.shape[0]
        return (h @ w.reshape(-1, w.shape[-1]).T).reshape(h.shape[0], n, -1).transpose(0, 1)
    return torch.bmm(h, w.transpose(1, 2))


def states(chain: Chain, params: dict, x: torch.Tensor) -> list[torch.Tensor]:
    """The input of every Linear and the output: ``[x, h_1, ..., h_L, out]``, hidden ones and
    the output ``[N, B, *]`` (``x`` as given, ``[B, d]`` or ``[N, B, d]``)."""
    act = make_activation(chain.activation)
    out = [x]
    for i, name in enumerate(chain.layers):
        z = _linear(out[i], params[f"{name}.weight"])
        if chain.bias:
            z = z + params[f"{name}.bias"][:, None, :]
        if i in chain.skips:
            z = z + _linear(out[i - 1], params[skip_name(chain, i)])
        out.append(act(z) if i < chain.depth else z)
    return out


def incoming(chain: Chain, params: dict, layer: int) -> torch.Tensor:
    """Each hidden neuron's incoming vector ``[w; s; b]`` (``s``: its skip row, where Linear
    ``layer`` has a skip): ``[N, width, fan_in (+ skip fan_in) (+1)]``."""
    name = chain.layers[layer]
    parts = [params[f"{name}.weight"]]
    if layer in chain.skips:
        parts.append(params[skip_name(chain, layer)])
    if chain.bias:
        parts.append(params[f"{name}.bias"][..., None])
    return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]


def with_incoming(chain: Chain, params: dict, layer: int, v: torch.Tensor) -> dict:
    """``params`` with Linear ``layer``'s rows replaced by the incoming vectors ``v [N, width,
    k]`` (the layout of :func:`incoming`)."""
    name = chain.layers[layer]
    params = dict(params)
    k = chain.fan_in(layer)
    params[f"{name}.weight"] = v[..., :k].contiguous()
    if layer in chain.skips:
        k2 = k + chain.fan_in(layer - 1)
        params[skip_name(chain, layer)] = v[..., k:k2].contiguous()
        k = k2
    if chain.bias:
        params[f"{name}.bias"] = v[..., k].contiguous()
    return params


def outgoing(chain: Chain, params: dict, layer: int) -> torch.Tensor:
    """Each hidden neuron's outgoing vector (column of the next weight): ``[N, width, fan_out]``."""
    return params[f"{chain.layers[layer + 1]}.weight"].transpose(1, 2)


def member(params: dict, n: int) -> dict:
    """State dict of network ``n`` of a stack (the ``mlp`` model's keys)."""
    return {k: v[n].detach().clone() for k, v in params.items()}


def stack(states: list[dict]) -> dict:
    """Stack same-shape state dicts along a new leading axis."""
    return {k: torch.stack([s[k].detach() for s in states]) for k in states[0]}


def init_stack(chain: Chain, count: int, seed: int, dtype=torch.float64, tag: str = "student"):
    """``count`` networks, each initialised like the registered ``mlp`` model (network ``n`` from
    ``seeding.derive(seed, tag, n)``), stacked. Skips start at zero."""
    from pipeline import seeding
    from pipeline.models import build

    inits = []
    for n in range(count):
        model = build(
            "mlp",
            (chain.input_dim,),
            chain.outputs,
            chain.model_options(),
            seeding.derive(seed, tag, n),
            dtype,
        )
        state = model.state_dict()
        renamed = dict(zip(chain.layers, _mlp_layers(chain.depth), strict=True))
        kinds = ("weight", "bias") if chain.bias else ("weight",)
        state = {f"{lay}.{p}": state[f"{renamed[lay]}.{p}"] for lay in chain.layers for p in kinds}
        for j in chain.skips:
            state[skip_name(chain, j)] = torch.zeros(
                chain.fan_out(j), chain.fan_in(j - 1), dtype=dtype
            )
        inits.append(state)
    return stack(inits)


def _mlp_layers(depth: int) -> tuple[str, ...]:
    return tuple(f"fc{i}" for i in range(1, depth + 1)) + ("out",)


# -- the per-network MSE and its gradient, by hand ---------------------------------------------
class StackedMSE:
    """``(per [N], grad [N, P])``: every network's ``L_n = mean_{b,o} (f_n(x_b)_o - y_bo)^2`` on
    ``x [B, d]`` (shared), ``y [B, o]`` and the gradient of ``sum_n L_n`` with respect to the flat
    buffer (the layout of :func:`layout`), by backpropagation written out:
    ``g_L = 2 (out - y) / (B o)``; per Linear ``i`` with input ``h_i`` and output gradient
    ``g_i``: ``dW_i = g_i^T h_i``, ``db_i = sum_b g_i``, (skip ``dS_i = g_i^T h_{i-1}``), and
    ``g_{i-1} = act'(z_{i-1}) * (g_i W_i (+ g_{i+1} S_{i+1}))``.

    All N networks run as one wide network: activations are ``[B, N width]`` (network-major
    within a row). The first Linear is one GEMM with the ``[N width, d]`` stacked weight; a later
    one is one GEMM with the block-diagonal ``[N out, N in]`` weight while that matrix has at
    most ``block_diagonal_max`` entries (N x the flops, but one call instead of N small ones:
    the toy students' case), else a batched matmul."""

    def __init__(self, chain: Chain, block_diagonal_max: int = 2**18):
        self.chain = chain
        self.block_diagonal_max = block_diagonal_max
        self.slices = [
            (k, o, o + int(torch.Size(s).numel()), s) for k, (o, s) in layout(chain).items()
        ]
        self.act = make_activation(chain.activation)
        grad = activation_backward(chain.activation)
        self.act_grad = lambda g, z, a: grad(self.act, g, z, a)
        self._blocks: dict = {}  # zero-initialised block-diagonal buffers, by owner
        self._views = None  # (flat, its per-Linear views)

    @torch.no_grad()
    def __call__(self, flat: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        c, n, batch = self.chain, flat.shape[0], x.shape[0]
        if self._views is None or self._views[0] is not flat:  # (a fit steps one buffer)
            p = {k: flat[:, o:e].view(n, *s) for k, o, e, s in self.slices}
            # each Linear: (weight [N, out, in], bias [N, out] or None, index of its input)
            linears = {
                i: [(p[f"{name}.weight"], p[f"{name}.bias"] if c.bias else None, i)]
                for i, name in enumerate(c.layers)
            }
            for j in c.skips:
                linears[j].append((p[skip_name(c, j)], None, j - 1))
            self._views = (flat, linears)
        linears = self._views[1]
        hs, zs, wide = [x], [], {}  # Linear inputs [B, K]; pre-activations; wide weights
        for i in range(c.depth + 1):
            z = None
            for k, (w, b, src) in enumerate(linears[i]):
                wide[i, k] = self._wide(w, src, (i, k))
                z = _wide_linear(hs[src], w, b, wide[i, k], z)
            if i < c.depth:
                zs.append(z)
                hs.append(self.act(z))
        diff = z.view(batch, n, c.outputs) - y[:, None, :]
        per = (diff**2).mean((0, 2))
        g = (diff * (2.0 / (batch * c.outputs))).view(batch, -1)
        grads, into = {}, {}  # parameter gradients; gradients into the hidden inputs
        for i in range(c.depth, -1, -1):
            name = c.layers[i]
            for k, (w, _, src) in enumerate(linears[i]):
                pname = f"{name}.weight" if k == 0 else skip_name(c, i)
                grads[pname] = _wide_weight_grad(g, hs[src], w, wide[i, k])
                if src > 0:
                    back = _wide_input_grad(g, w, wide[i, k])
                    into[src] = back if src not in into else into[src].add_(back)
            if c.bias:
                grads[f"{name}.bias"] = g.sum(0).view(n, -1)
            if i == 0:
                break
            g = self.act_grad(into.pop(i), zs[i - 1], hs[i])
        grad = torch.empty_like(flat)
        for k, o, e, s in self.slices:
            grad[:, o:e].view(n, *s).copy_(grads[k])
        return per, grad

    def _wide(self, w: torch.Tensor, src: int, which: tuple) -> torch.Tensor | None:
        """The ``[N out, K]`` weight of the wide network for stacked ``w [N, out, in]``: the
        stack itself on the shared input, the block-diagonal matrix on a stacked one (``None``:
        too large, a batched matmul instead); ``which``: the buffer's owner (layer, k)."""
        n, o, k = w.shape
        if src == 0:
            return w.reshape(n * o, k)
        if n * o * n * k > self.block_diagonal_max:
            return None
        key = (which, n, w.dtype, w.device)
        if key not in self._blocks:
            self._blocks[key] = torch.zeros(n * o, n * k, dtype=w.dtype, device=w.device)
        wide = self._blocks[key]
        wide.view(n, o, n, k).diagonal(dim1=0, dim2=2).copy_(w.permute(1, 2, 0))
        return wide


def _mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b``, computed as ``(b^T a^T)^T`` where that makes the product's rows the longer
    side (BLAS is several times faster on the small GEMMs of toy students that way); the
    result may be a transposed view."""
    return (b.T @ a.T).T if b.shape[1] < a.shape[0] else a @ b


def _wide_linear(h, w, b, wide, z):
    """``z (+) h W^T + b`` in the wide layout: ``h [B, K]``, result ``[B, N out]``."""
    if wide is not None:
        out = _mm(h, wide.T)
        if b is not None:
            out += b.reshape(-1)
        return out if z is None else z.add_(out)
    n, o, k = w.shape
    h3 = h.view(h.shape[0], n, k).transpose(0, 1)
    out = torch.bmm(h3, w.transpose(1, 2)) if b is None else torch.baddbmm(b[:, None], h3, w.mT)
    out = out.transpose(0, 1).reshape(h.shape[0], n * o)
    return out if z is None else z.add_(out)


def _wide_weight_grad(g, h, w, wide):
    """``[N, out, in]`` gradient ``g^T h`` of stacked ``w``: ``g [B, N out]``, ``h [B, K]``."""
    n, o, k = w.shape
    if wide is None:
        g3 = g.view(g.shape[0], n, o).transpose(0, 1)
        return torch.bmm(g3.transpose(1, 2), h.view(h.shape[0], n, k).transpose(0, 1))
    full = _mm(g.T, h)  # [N out, K]
    if wide.shape[1] == k:  # the shared input
        return full.view(n, o, k)
    return full.view(n, o, n, k).diagonal(dim1=0, dim2=2).permute(2, 0, 1)


def _wide_input_grad(g, w, wide):
    """``[B, N in]`` gradient ``g W`` into a stacked input."""
    if wide is not None:
        return _mm(g, wide)
    n, o, k = w.shape
    g3 = g.view(g.shape[0], n, o).transpose(0, 1)
    return torch.bmm(g3, w).transpose(0, 1).reshape(g.shape[0], n * k)
