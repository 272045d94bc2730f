"""Batches for training and evaluation, reproducible from ``(seed, epoch)``.

:class:`TensorData` keeps a whole split on the device (raw values, normalised per batch) and cuts
minibatches by indexing with a permutation drawn from ``seeding.generator(seed, "order", epoch)``.
:class:`FolderData` decodes image files in DataLoader workers in the same per-epoch order. Both
apply augmentation (random crop with 4-pixel zero padding, horizontal flip) on the device with a
generator derived from ``(seed, epoch, batch)``, so a run resumed in the middle of an epoch sees
exactly the batches the uninterrupted run saw.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline import seeding
from pipeline.data import Source


def augment(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random ``pad``-pixel translation (zero padded) and horizontal flip of ``x: [N, C, H, W]``."""
    n, _, h, w = x.shape
    shift = torch.randint(0, 2 * pad + 1, (2, n), generator=gen).to(x.device)
    flip = (torch.rand(n, generator=gen) < 0.5).to(x.device)
    padded = F.pad(x, (pad, pad, pad, pad))
    rows = (shift[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]
    cols = (shift[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    out = padded[batch, chan, rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(-1), out)


class _Normaliser:
    def __init__(self, source: Source, device, dtype):
        self.scale = source.scale
        shape = (1, -1) + (1,) * (len(source.input_shape) - 1)
        self.mean = torch.tensor(source.mean or [0.0], dtype=dtype, device=device).reshape(shape)
        self.std = torch.tensor(source.std or [1.0], dtype=dtype, device=device).reshape(shape)
        self.dtype = dtype

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if self.scale != 1.0:
            x = x / self.scale
        return (x - self.mean) / self.std


class TensorData:
    """A split resident on the device: ``x`` raw values ``[N, ...]``, ``y`` labels ``[N]``."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, normalise: _Normaliser):
        self.x, self.y, self.normalise = x, y, normalise

    def __len__(self) -> int:
        return len(self.y)

    def num_batches(self, batch_size: int, drop_last: bool) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def train_batches(self, batch_size, drop_last, seed, epoch, start=0, augment_images=False):
        """Yield ``(x, y)`` minibatches of epoch ``epoch``, from batch index ``start`` on."""
        order = torch.randperm(len(self), generator=seeding.generator(seed, "order", epoch))
        order = order.to(self.x.device)
        for b in range(start, self.num_batches(batch_size, drop_last)):
            idx = order[b * batch_size : (b + 1) * batch_size]
            x = self.normalise(self.x[idx])
            if augment_images:
                x = augment(x, seeding.generator(seed, "augment", epoch, b))
            yield x, self.y[idx]

    def eval_batches(self, batch_size: int):
        for i in range(0, len(self), batch_size):
            yield self.normalise(self.x[i : i + batch_size]), self.y[i : i + batch_size]


class _ImageFiles(torch.utils.data.Dataset):
    def __init__(self, items, size):
        self.items, self.size = items, size

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from PIL import Image

        path, label = self.items[i]
        with Image.open(path) as img:
            img = img.convert("RGB")
            if img.size != (self.size, self.size):
                short = min(img.size)
                left, top = (img.size[0] - short) // 2, (img.size[1] - short) // 2
                img = img.crop((left, top, left + short, top + short))
                img = img.resize((self.size, self.size), Image.BILINEAR)
            data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
        return data.reshape(self.size, self.size, 3).permute(2, 0, 1), label


class FolderData:
    """A split decoded from image files by DataLoader workers (Tiny ImageNet, ImageNet)."""

    def __init__(self, items, size, normalise: _Normaliser, device, workers: int = 4):
        self.files = _ImageFiles(items, size)
        self.normalise, self.device, self.workers = normalise, device, workers

    def __len__(self) -> int:
        return len(self.files)

    num_batches = TensorData.num_batches

    def _loader(self, indices, batch_size):
        sampler = torch.utils.data.BatchSampler(indices, batch_size, drop_last=False)
        return torch.utils.data.DataLoader(
            self.files, batch_sampler=sampler, num_workers=self.workers, persistent_workers=False
        )

    def train_batches(self, batch_size, drop_last, seed, epoch, start=0, augment_images=False):
        order = torch.randperm(len(self), generator=seeding.generator(seed, "order", epoch))
        stop = self.num_batches(batch_size, drop_last) * batch_size
        indices = order[start * batch_size : min(stop, len(self))].tolist()
        for b, (x, y) in enumerate(self._loader(indices, batch_size), start=start):
            x = self.normalise(x.to(self.device))
            if augment_images:
                x = augment(x, seeding.generator(seed, "augment", epoch, b))
            yield x, y.to(self.device)

    def eval_batches(self, batch_size: int):
        for x, y in self._loader(list(range(len(self))), batch_size):
            yield self.normalise(x.to(self.device)), y.to(self.device)


@dataclass
class Splits:
    train: TensorData | FolderData
    val: TensorData | FolderData | None
    test: TensorData | FolderData
    num_classes: int
    input_shape: tuple[int, ...]
    heads: int = 1

    @property
    def num_outputs(self) -> int:
        """Width of the model's output layer: classes times heads."""
        return self.num_classes * self.heads

    def eval_splits(self) -> dict:
        out = {"test": self.test}
        if self.val is not None and len(self.val):
            out = {"val": self.val, **out}
        return out


def _holdout(name: str, n: int, val_fraction: float):
    """A fixed train/validation split of ``n`` items, the same for every run of a dataset."""
    n_val = int(round(n * val_fraction))
    perm = torch.randperm(n, generator=seeding.generator(0, "validation-split", name))
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def make_splits(name: str, source: Source, val_fraction: float, subset: int, device, dtype):
    dtype = dtype or torch.get_default_dtype()
    norm = _Normaliser(source, device, dtype)
    if source.arrays:
        x, y = (torch.as_tensor(a) for a in source.arrays["train"])
        train_idx, val_idx = _holdout(name, len(y), val_fraction)
        if subset:
            train_idx = train_idx[:subset]
        xt, yt = (torch.as_tensor(a) for a in source.arrays["test"])

        def split(xs, ys):
            return TensorData(xs.to(device), ys.long().to(device), norm)

        return Splits(
            split(x[train_idx], y[train_idx]),
            split(x[val_idx], y[val_idx]) if len(val_idx) else None,
            split(xt, yt),
            source.num_classes,
            source.input_shape,
            source.heads,
        )
    items = source.folders["train"]
    train_idx, val_idx = _holdout(name, len(items), val_fraction)
    if subset:
        train_idx = train_idx[:subset]
    size = source.input_shape[-1]

    def folder(sel):
        return FolderData(sel, size, norm, device)

    return Splits(
        folder([items[i] for i in train_idx]),
        folder([items[i] for i in val_idx]) if len(val_idx) else None,
        folder(source.folders["test"]),
        source.num_classes,
        source.input_shape,
    )
