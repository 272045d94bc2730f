"""Synthetic arithmetic tasks (Csordas et al. 2021) and the subtask views a weight mask trains on.

Registered datasets (generated here from fixed seeds, nothing on disk):

- ``addmul``: items ``(a, b, op)`` with two-digit ``a, b`` and ``op`` in {+, x}. Inputs: the one-hot
  digits of ``a`` and ``b``, little-endian (ones, tens; 4 x 10), then a one-hot op flag (2): 42
  features. Labels ``[N, 2]``: the digits of ``(a op b) mod 100`` (two 10-way heads). The task is
  a finite table of 20,000 items; the paper draws 1M training items from it, so its validation set
  measures recall of the table. Here train and test are both the whole table (in seeded orders).
- ``double_add``: two independent pairs ``(a, b)`` and ``(c, d)``. Inputs: pair 1's one-hot
  digits, then pair 2's (80); labels ``[N, 4]``: the digits of ``(a + b) mod 100``, then of
  ``(c + d) mod 100``. Every item asks about one pair: the other pair's inputs are zero and its
  labels are :data:`IGNORE` (cross-entropy skips them). The table is 2 x 10,000 items.

Subtasks (:func:`subtask`) name the slice of a dataset a mask is trained or evaluated on:
``all``; ``add`` / ``mul`` (addmul, by op flag); ``pair1`` / ``pair2`` (double_add, by which pair
is asked); ``without_<c>`` (any single-head dataset: every class but ``c``, for class removal);
``permuted_<k>`` (any dataset: input features permuted by permutation ``k``, ``k = 0`` the
identity, the others drawn from seed ``k``: permuted MNIST / digits).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import seeding
from pipeline.data import Source, register_dataset

#: Label of a head an item does not ask about (``torch.nn.functional.cross_entropy``'s default
#: ``ignore_index``): the loss skips it and accuracy treats it as correct.
IGNORE = -100
DIGITS = 2  # two-digit numbers, results mod 100
BASE = 10


def one_hot_digits(numbers: np.ndarray, n_digits: int = DIGITS) -> np.ndarray:
    """``numbers [N, k]`` -> ``[N, k * n_digits * 10]`` uint8: per number, per digit (ones first)
    a one-hot block of 10."""
    numbers = np.asarray(numbers)
    digits = digit_labels(numbers, n_digits)  # [N, k, n_digits]
    out = np.zeros((*digits.shape, BASE), dtype=np.uint8)
    np.put_along_axis(out, digits[..., None], 1, axis=-1)
    return out.reshape(len(numbers), -1)


def digit_labels(numbers: np.ndarray, n_digits: int = DIGITS) -> np.ndarray:
    """Digits of ``numbers`` (any shape), little-endian, on a new last axis of ``n_digits``."""
    powers = BASE ** np.arange(n_digits)
    return (np.asarray(numbers)[..., None] // powers) % BASE


def addmul_table() -> tuple[np.ndarray, np.ndarray]:
    """All 20,000 items ``(a, b, op)``: inputs ``[N, 42]`` uint8, labels ``[N, 2]`` int64, in the
    order ``op`` (add, mul), ``a``, ``b``."""
    mod = BASE**DIGITS
    op, a, b = (
        g.ravel() for g in np.meshgrid(np.arange(2), np.arange(mod), np.arange(mod), indexing="ij")
    )
    result = np.where(op == 0, a + b, a * b) % mod
    x = np.concatenate([one_hot_digits(np.stack([a, b], 1)), np.eye(2, dtype=np.uint8)[op]], 1)
    return x, digit_labels(result).astype(np.int64)


def double_add_table() -> tuple[np.ndarray, np.ndarray]:
    """Both pairs' 10,000 items each: inputs ``[20000, 80]``, labels ``[20000, 4]`` (IGNORE for
    the pair not asked about). Rows ``0..9999`` ask about pair 1, the rest about pair 2."""
    mod = BASE**DIGITS
    a, b = (g.ravel() for g in np.meshgrid(np.arange(mod), np.arange(mod), indexing="ij"))
    pair = one_hot_digits(np.stack([a, b], 1))  # [10000, 40]
    zeros = np.zeros_like(pair)
    digits = digit_labels((a + b) % mod).astype(np.int64)
    ignore = np.full_like(digits, IGNORE)
    x = np.concatenate([np.concatenate([pair, zeros], 1), np.concatenate([zeros, pair], 1)])
    y = np.concatenate([np.concatenate([digits, ignore], 1), np.concatenate([ignore, digits], 1)])
    return x, y


def _table_source(name: str, x: np.ndarray, y: np.ndarray) -> Source:
    splits = {}
    for split in ("train", "test"):
        order = np.random.default_rng(seeding.derive(0, name, split)).permutation(len(y))
        splits[split] = (x[order], y[order])
    return Source(BASE, (x.shape[1],), arrays=splits, heads=y.shape[1])


@register_dataset("addmul")
def addmul(data_dir: Path) -> Source:
    """Addition / multiplication of two-digit numbers mod 100 (42 one-hot inputs, 2 heads)."""
    return _table_source("addmul", *addmul_table())


@register_dataset("double_add")
def double_add(data_dir: Path) -> Source:
    """Two independent two-digit additions mod 100, one asked per item (80 inputs, 4 heads)."""
    return _table_source("double_add", *double_add_table())


# -- subtasks ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Subtask:
    """``select(x_raw, y) -> bool [N]`` (torch tensors): the items kept; ``transform(x) -> x``:
    applied to normalised input batches ``[n, ...]`` (None: identity)."""

    name: str
    select: Callable
    transform: Callable | None = None


def _all(x, y):
    import torch

    return torch.ones(len(y), dtype=torch.bool, device=y.device)


def _op_flag(column: int):
    return lambda x, y: x[:, column] == 1


def _asks_about(head: int):
    return lambda x, y: y[:, head] != IGNORE


def pixel_permutation(num_features: int, index: int):
    """Permutation ``index`` of ``num_features`` input features (0: the identity), a LongTensor."""
    import torch

    if index == 0:
        return torch.arange(num_features)
    return torch.randperm(num_features, generator=seeding.generator(index, "pixel-permutation"))


def _permuted(index: int):
    def transform(x):
        flat = x.reshape(len(x), -1)
        perm = pixel_permutation(flat.shape[1], index).to(x.device)
        return flat[:, perm].reshape(x.shape)

    return transform


SUBTASKS = {
    "addmul": {"add": _op_flag(40), "mul": _op_flag(41)},
    "double_add": {"pair1": _asks_about(0), "pair2": _asks_about(2)},
}


def subtask(dataset: str, name: str) -> Subtask:
    """The subtask ``name`` of ``dataset`` (see the module docstring for the names)."""
    if name == "all":
        return Subtask(name, _all)
    if name in SUBTASKS.get(dataset, {}):
        return Subtask(name, SUBTASKS[dataset][name])
    if m := re.fullmatch(r"without_(\d+)", name):
        removed = int(m.group(1))

        def without(x, y):
            if y.ndim != 1:
                raise ValueError(f"subtask {name!r}: class removal needs single-head labels")
            return y != removed

        return Subtask(name, without)
    if m := re.fullmatch(r"permuted_(\d+)", name):
        return Subtask(name, _all, _permuted(int(m.group(1))))
    allowed = ["all", *SUBTASKS.get(dataset, {}), "without_<class>", "permuted_<k>"]
    raise ValueError(
        f"unknown subtask {name!r} of dataset {dataset!r}; allowed: " + ", ".join(allowed)
    )
