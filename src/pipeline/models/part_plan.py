"""Every part's per-neuron sums of squares in a handful of tensor operations.

:func:`pipeline.models.reductions.part_sumsq` reduces one slice at a time: for a small network
the per-step trace then spends its time dispatching a few hundred tiny operations. A
:class:`PartSumsq` plans the same reductions once, from the parameters' shapes, and runs them on
the parameters flattened into one vector ``flat`` (``[N]``, the tensors' ``reshape(-1)`` in
order):

1. ``sq = flat * flat``;
2. each slice ``[size, L]`` of :func:`~pipeline.models.reductions.per_neuron` (``size`` neurons,
   ``L`` entries each) joins a *class* of slices reduced alike: ``inner`` (a neuron's entries lie
   contiguous when ``per_neuron`` sums them: row sums ``[R, L]``), ``outer`` (its neurons lie
   contiguous: column sums ``[S, L, size]``, batched only over slices of equal ``size``, since
   torch's column sum treats blocks of four vectors of columns and the rest differently) or
   ``single`` (``L = 1``: the square itself). One ``index_select`` gathers every class's entries in
   ``per_neuron``'s order, and one ``sum`` per class reduces them;
3. each part adds its slices' sums in the order of its slices (a part with fewer slices than
   the most adds exact zeros): one gather and one sum over up to three summands (fewer than four
   rows are added in order), one add per summand beyond.

Since every sum reduces the same entries, in the same order, with the same memory layout as
``per_neuron`` does, the results equal :func:`~pipeline.models.reductions.part_sumsq`'s bit for
bit on one CPU thread (the
training jobs' setting; ``tests/test_trace_plan.py`` checks it on random registered models, and
the default's trace.h5 is byte-identical). With more threads torch may split a large sum
differently for the batched and the per-slice shapes; on CUDA the reduction kernels' schedule
depends on the shape, so there the numbers agree to rounding. A slice whose layout fits no class
(or a single neuron over so many entries that a multi-threaded sum would split its row) is
reduced by ``per_neuron`` itself.
"""

from __future__ import annotations

import torch

from pipeline.models.reductions import Part, per_neuron
from pipeline.models.structure import Slice

#: The column sums of the logit layer's weight ``[C, D]`` as per-neuron sums over its columns.
_COLUMNS = Slice("", axis=1)
#: Entries below which a torch reduction on the CPU runs on one thread (at::internal::GRAIN_SIZE).
_GRAIN = 32768


def _reference_rows(x: torch.Tensor, sl, size: int) -> torch.Tensor:
    """``per_neuron``'s view of ``x`` before its sum: ``[size, L]`` (same ops, same layout)."""
    if sl.axis != 0:
        x = x.swapaxes(0, sl.axis)
    x = x[sl.start : sl.start + size * sl.block]
    return (x * x).reshape(size, -1)


def _positions(shape, offset: int, sl, size: int) -> torch.Tensor:
    """Flat positions (into the concatenated vector) of the slice's entries, ``[size, L]`` in
    ``per_neuron``'s order."""
    ids = torch.arange(offset, offset + _numel(shape)).view(shape)
    if sl.axis != 0:
        ids = ids.swapaxes(0, sl.axis)
    return ids[sl.start : sl.start + size * sl.block].reshape(size, -1)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _layout(like: torch.Tensor, sl, size: int) -> str:
    """The class of the slice's reduction, read off ``per_neuron``'s ops on an uninitialised
    tensor with ``like``'s shape, strides and dtype (on the CPU: a meta tensor would route the
    ops through torch's decompositions, which import ``torch._dynamo`` and sympy, seconds of
    start-up for every traced run)."""
    blank = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype)
    rows = _reference_rows(blank, sl, size)
    length = rows.shape[1]
    if length == 1:
        return "single"
    if size == 1:
        return "inner" if length < _GRAIN else "fallback"
    if rows.stride(1) == 1:
        return "inner"
    if rows.stride(0) == 1:
        return "outer"
    return "fallback"


class PartSumsq:
    """``part_sumsq`` of every part of ``parts``, concatenated (``[sum of part sizes]``), for
    tensors shaped like ``like`` (name -> tensor, passed in this order); with ``columns``
    (the logit layer's weight and bias names, the bias may be ``None``) the
    :func:`~pipeline.models.reductions.column_sums` of those tensors follow (``[D (+1)]``).

    Everything lives in one buffer, allocated once: the flattened tensors ``[N]``, their squares
    ``[N]``, the entries each class gathers, the classes' sums, and a zero. A call writes the
    buffer in place and returns a new tensor.
    """

    def __init__(
        self,
        parts: list[Part],
        like: dict[str, torch.Tensor],
        columns: tuple[str, str | None] | None = None,
    ):
        tensors = list(like.values())
        self.shapes = [tuple(t.shape) for t in tensors]
        self.size = sum(p.size for p in parts)
        dtypes = {t.dtype for t in tensors}
        if len(dtypes) > 1:
            raise ValueError(
                f"PartSumsq: parameters of one dtype expected, got {sorted(map(str, dtypes))}"
            )
        dtype = tensors[0].dtype if tensors else torch.float64
        device = tensors[0].device if tensors else torch.device("cpu")
        numel = sum(t.numel() for t in tensors)
        offsets, at = {}, 0
        for n, t in like.items():
            offsets[n] = at
            at += t.numel()
        # output blocks (a part, or the column sums): per block its size and, per summand, a
        # slice reference: (class key, index in the class) or ("fallback", index)
        classes: dict[tuple, list[torch.Tensor]] = {}
        fallback: list[tuple] = []
        blocks: list[tuple[int, list]] = []

        def add(key, pos):
            classes.setdefault(key, []).append(pos)
            return (key, len(classes[key]) - 1)

        for part in parts:
            refs = []
            for sl in part.slices:
                t = like[sl.param]
                kind = _layout(t, sl, part.size)
                if kind == "fallback":
                    refs.append(("fallback", len(fallback)))
                    fallback.append((list(like).index(sl.param), sl, part.size))
                    continue
                pos = numel + _positions(t.shape, offsets[sl.param], sl, part.size)  # squares
                # an outer sum's order depends on its number of neurons: batch only equal ones
                key = (kind, pos.shape[1]) + ((part.size,) if kind == "outer" else ())
                refs.append(add(key, pos))
            blocks.append((part.size, refs))
        self.columns = columns is not None
        if columns is not None:  # weight.sum(0): an outer sum; bias.sum(0): one row
            w, b = columns
            classes_of_d = like[w].shape[1]
            pos = _positions(like[w].shape, offsets[w], _COLUMNS, classes_of_d)
            blocks.append((classes_of_d, [add(("outer", pos.shape[1], classes_of_d), pos)]))
            if b is not None:
                pos = torch.arange(offsets[b], offsets[b] + like[b].numel()).view(1, -1)
                blocks.append((1, [add(("inner", pos.shape[1]), pos)]))
        # the buffer: [flat | squares | gathered entries | sums | fallback sums | zero]
        gathered = sum(pos.numel() for pos in sum(classes.values(), []))
        sums = sum(pos.shape[0] for k, v in classes.items() if k[0] != "single" for pos in v)
        sums += sum(size for _, _, size in fallback)
        self.buffer = torch.zeros(2 * numel + gathered + sums + 1, dtype=dtype, device=device)
        self.flat = self.buffer[:numel]
        self.squares = self.buffer[numel : 2 * numel]
        self.source = self.buffer[: 2 * numel]
        self.gathered = self.buffer[2 * numel : 2 * numel + gathered]
        zero = self.buffer.numel() - 1
        where: dict[tuple, list[int]] = {}  # class key -> buffer position of each slice's sums
        index, self.steps = [], []
        g_at, s_at = 2 * numel, 2 * numel + gathered
        for key, slices in classes.items():
            kind = key[0]
            if kind == "outer":  # [S, L, size]: each slice's neurons contiguous, as per_neuron
                entries = torch.stack([pos.t() for pos in slices])
            else:  # [R, L]
                entries = torch.cat(slices, 0)
            index.append(entries.reshape(-1))
            count = entries.numel()
            if kind == "single":  # one entry per neuron: its square is its sum
                firsts, at = [], g_at
            else:
                rows = self.buffer[g_at : g_at + count].view(entries.shape)
                out_shape = entries.shape[:1] + entries.shape[2:]
                outputs = out_shape.numel()
                out = self.buffer[s_at : s_at + outputs].view(out_shape)
                self.steps.append((rows, 1, out))
                firsts, at = [], s_at
                s_at += outputs
            for pos in slices:
                firsts.append(at)
                at += pos.shape[0]
            where[key] = firsts
            g_at += count
        self.index = (
            torch.cat(index).to(device) if index else torch.zeros(0, dtype=torch.long)
        ).to(device)
        self.fallback = []
        for i, sl, size in fallback:
            self.fallback.append((i, sl, size, s_at))
            s_at += size
        depth = max((len(refs) for _, refs in blocks), default=0)
        gather = [[] for _ in range(depth)]
        for size, refs in blocks:
            for k in range(depth):
                if k >= len(refs):
                    gather[k].extend([zero] * size)
                    continue
                key, j = refs[k]
                base = self.fallback[j][3] if key == "fallback" else where[key][j]
                gather[k].extend(range(base, base + size))
        # up to three summands: one gather [depth, columns] and a sum over the first axis, which
        # adds them in order (an outer sum of fewer than 4 rows is sequential); more: one by one
        self.depth = depth
        if 1 < depth <= 3:
            self.gather = [torch.tensor(sum(gather, []), dtype=torch.long, device=device)]
        else:
            self.gather = [torch.tensor(g, dtype=torch.long, device=device) for g in gather]
        self._loaded: list[torch.Tensor] = []
        self._views: list[torch.Tensor] = []

    def load(self, tensors: list[torch.Tensor], out: torch.Tensor | None = None) -> torch.Tensor:
        """Flatten ``tensors`` (in the order of ``like``) into ``out`` (default: the buffer's
        ``flat``, ``[N]``) and return it. The views of tensors passed again (parameters,
        momentum buffers) are reused."""
        out = self.flat if out is None else out
        if len(tensors) != len(self._loaded) or any(
            a is not b for a, b in zip(tensors, self._loaded, strict=True)
        ):
            contiguous = all(t.is_contiguous() for t in tensors)
            self._views = [t.reshape(-1) for t in tensors]
            self._loaded = list(tensors) if contiguous else []
        if self._views:
            torch.cat(self._views, out=out)
        return out

    def forget(self) -> None:
        """Drop the references to the tensors last loaded (e.g. gradients about to be freed)."""
        self._loaded, self._views = [], []

    def __call__(self, tensors: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The parts' sums of squares (then the column sums) of ``tensors``, or of what
        ``flat`` holds; ``tensors`` are needed by fallback slices."""
        if tensors is not None:
            self.load(tensors)
        if not self.gather:
            return self.buffer.new_zeros(self.size)
        torch.mul(self.flat, self.flat, out=self.squares)
        torch.index_select(self.source, 0, self.index, out=self.gathered)
        for rows, dim, out in self.steps:
            torch.sum(rows, dim, out=out)
        if self.fallback:
            views = tensors if tensors is not None else self._unflatten()
            for i, sl, size, at in self.fallback:
                self.buffer[at : at + size] = per_neuron(views[i], sl, size)
        if 1 < self.depth <= 3:
            return self.buffer.index_select(0, self.gather[0]).view(self.depth, -1).sum(0)
        total = self.buffer.index_select(0, self.gather[0])
        for g in self.gather[1:]:
            total.add_(self.buffer.index_select(0, g))
        return total

    def _unflatten(self) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like the planned tensors (contiguous)."""
        out, at = [], 0
        for shape in self.shapes:
            n = _numel(shape)
            out.append(self.flat[at : at + n].view(shape))
            at += n
        return out
