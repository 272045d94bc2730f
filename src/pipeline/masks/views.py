"""The data of one subtask: a resident split, the indices of its items, an input transform.

Mask training draws batches from an endless stream (the paper's infinite sampler): epoch ``e``
visits the items in the order ``randperm`` under ``seeding.generator(seed, "mask-order", e)``,
in full batches, so a mask's data order is a function of its seed alone (two seeds: two data
orders, for the stability analysis).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from pipeline import seeding
from pipeline.data.tasks import subtask
from pipeline.data.tensors import Splits, TensorData


@dataclass
class View:
    name: str
    data: TensorData
    index: torch.Tensor  # items of ``data`` in this view
    transform: Callable | None = None

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised (and transformed) inputs and labels of the view's items ``positions``."""
        idx = self.index[positions]
        x = self.data.normalise(self.data.x[idx])
        if self.transform is not None:
            x = self.transform(x)
        return x, self.data.y[idx]

    def batches(self, batch_size: int, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Full training batches, endlessly, in an order fixed by ``seed``."""
        if len(self) < batch_size:
            raise ValueError(
                f"subtask {self.name!r} has {len(self)} items, fewer than the mask "
                f"batch size {batch_size}"
            )
        epoch = 0
        while True:
            order = torch.randperm(
                len(self), generator=seeding.generator(seed, "mask-order", epoch)
            )
            order = order.to(self.index.device)
            for b in range(len(self) // batch_size):
                yield self.batch(order[b * batch_size : (b + 1) * batch_size])
            epoch += 1

    def eval_batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        positions = torch.arange(len(self), device=self.index.device)
        for i in range(0, len(self), batch_size):
            yield self.batch(positions[i : i + batch_size])


def subtask_view(splits: Splits, dataset: str, name: str, split: str = "train") -> View:
    """Subtask ``name`` (see :func:`pipeline.data.tasks.subtask`) of split ``split``."""
    part = {"train": splits.train, "val": splits.val, "test": splits.test}.get(split)
    if part is None:
        raise ValueError(f"dataset {dataset!r} has no {split!r} split (dataset.val_fraction 0?)")
    if not isinstance(part, TensorData):
        raise ValueError(f"dataset {dataset!r}: masks need a resident dataset, not image folders")
    task = subtask(dataset, name)
    keep = task.select(part.x, part.y)
    index = torch.nonzero(keep, as_tuple=False).flatten()
    if len(index) == 0:
        raise ValueError(f"subtask {name!r} of dataset {dataset!r} selects no {split} items")
    return View(name, part, index, task.transform)
