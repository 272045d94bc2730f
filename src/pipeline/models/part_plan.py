"""Every part's per-neuron sums of squares in a handful of tensor operations.

:func:`pipeline.models.reductions.part_sumsq` reduces one slice at a time: for a small network
the per-step trace then spends its time dispatching a few hundred tiny operations. A
:class:`PartSumsq` plans the same reductions once, from the parameters' shapes, and runs them on
the parameters flattened into one vector ``flat`` (``[N]``, the tensors' ``reshape(-1)`` in
order):

1. ``sq = flat * flat``;
2. each slice ``[size, L]`` of :func:`~pipeline.models.reductions.per_neuron` (``size`` neurons,
   ``L`` entries each) joins a *class* of slices reduced alike: ``inner`` (the slice's entries of
   a neuron lie contiguous when ``per_neuron`` sums them: a row sum), ``outer`` (its neurons lie
   contiguous: a column sum) or ``single`` (``L = 1``: the square itself). One ``index_select``
   gathers a class's entries into ``[R, L]`` (``[L, R]`` for ``outer``) in ``per_neuron``'s
   order, and one ``sum`` reduces them;
3. each part adds its slices' sums in the order of its slices (a part with fewer slices than
   the most adds exact zeros).

Since every sum reduces the same entries, in the same order, with the same memory layout as
``per_neuron`` does, the results equal :func:`part_sumsq`'s bit for bit on the CPU (the tests
check it on random registered models). A slice whose layout fits no class (or a single neuron
over so many entries that a multi-threaded sum would split its row) is reduced by
``per_neuron`` itself.
"""

from __future__ import annotations

import torch

from pipeline.models.reductions import Part, per_neuron

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
    """The class of the slice's reduction, read off ``per_neuron``'s ops on a meta tensor with
    ``like``'s shape, strides and dtype."""
    meta = torch.empty_strided(like.shape, like.stride(), dtype=like.dtype, device="meta")
    rows = _reference_rows(meta, sl, size)
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
    tensors shaped like ``like`` (name -> tensor, in the order the tensors are passed)."""

    def __init__(self, parts: list[Part], like: dict[str, torch.Tensor]):
        self.names = list(like)
        self.shapes = [tuple(t.shape) for t in like.values()]
        self.size = sum(p.size for p in parts)
        self.numel = sum(t.numel() for t in like.values())
        offsets, at = {}, 0
        for n, t in like.items():
            offsets[n] = at
            at += t.numel()
        device = next(iter(like.values())).device if like else torch.device("cpu")
        dtype = next(iter(like.values())).dtype if like else torch.float64
        # slices by class: (kind, L) -> [(slot in the sums buffer, positions [size, L])]
        classes: dict[tuple, list[torch.Tensor]] = {}
        fallback: list[tuple] = []
        where: list[list[tuple]] = []  # per part: per slice, (class key, index) or fallback
        for part in parts:
            refs = []
            for sl in part.slices:
                t = like[sl.param]
                kind = _layout(t, sl, part.size)
                if kind == "fallback":
                    refs.append(("fallback", len(fallback)))
                    fallback.append((self.names.index(sl.param), sl, part.size))
                    continue
                pos = _positions(t.shape, offsets[sl.param], sl, part.size)
                # an outer sum's order depends on its number of neurons: batch only equal ones
                key = (kind, pos.shape[1]) + ((part.size,) if kind == "outer" else ())
                refs.append((key, len(classes.setdefault(key, []))))
                classes[key].append(pos)
            where.append(refs)
        # the sums buffer: every class's rows, then the fallback slices, then one zero
        self.steps, start, first = [], 0, {}
        for key, blocks in classes.items():
            kind, length = key[:2]
            first[key] = []
            for pos in blocks:
                first[key].append(start)
                start += pos.shape[0]
            count = start - first[key][0]
            if kind == "outer":  # [S, L, size]: each slice's neurons contiguous, as in per_neuron
                index, shape, dim = torch.stack([pos.t() for pos in blocks]), None, 1
                shape = tuple(index.shape)
            elif kind == "inner":  # [R, L]
                index, dim = torch.cat(blocks, 0), 1
                shape = tuple(index.shape)
            else:
                index, shape, dim = torch.cat(blocks, 0), None, None
            self.steps.append((shape, dim, start - count, count, index.reshape(-1).to(device)))
        self.fallback = []
        for i, sl, size in fallback:
            self.fallback.append((i, sl, size, start))
            start += size
        zero = start
        self.sums = torch.zeros(start + 1, dtype=dtype, device=device)
        # per part column: where each of its slices' sums sits (the zero slot past its slices)
        depth = max((len(r) for r in where), default=0)
        gather = [[] for _ in range(depth)]
        for part, refs in zip(parts, where, strict=True):
            for k in range(depth):
                if k < len(refs):
                    key, j = refs[k]
                    base = self.fallback[j][3] if key == "fallback" else first[key][j]
                    gather[k].extend(range(base, base + part.size))
                else:
                    gather[k].extend([zero] * part.size)
        self.gather = [torch.tensor(g, dtype=torch.long, device=device) for g in gather]

    def flatten(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """The tensors (in the order of ``like``) as one vector ``[N]``."""
        return torch.cat([t.reshape(-1) for t in tensors])

    def __call__(self, flat: torch.Tensor, tensors: list[torch.Tensor] | None = None):
        """The parts' sums of squares of ``flat`` (``[N]``); ``tensors``: the unflattened
        tensors, needed only by fallback slices (views of ``flat`` otherwise)."""
        if not self.gather:
            return flat.new_zeros(self.size)
        sq = flat * flat
        if self.sums.dtype != flat.dtype:
            self.sums = flat.new_zeros(self.sums.shape)
        sums = self.sums
        for shape, dim, at, count, index in self.steps:
            out = sums[at : at + count]
            if dim is None:  # one entry per neuron: its square
                torch.index_select(sq, 0, index, out=out)
            else:
                rows = sq.index_select(0, index).view(shape)
                torch.sum(rows, dim, out=out.view(shape[:dim] + shape[dim + 1 :]))
        if self.fallback:
            if tensors is None:
                tensors = self._unflatten(flat)
            for i, sl, size, at in self.fallback:
                sums[at : at + size] = per_neuron(tensors[i], sl, size)
        total = sums.index_select(0, self.gather[0])
        for g in self.gather[1:]:
            total.add_(sums.index_select(0, g))
        return total

    def _unflatten(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """Views of ``flat`` shaped like the planned tensors (contiguous)."""
        out, at = [], 0
        for shape in self.shapes:
            n = _numel(shape)
            out.append(flat[at : at + n].view(shape))
            at += n
        return out
