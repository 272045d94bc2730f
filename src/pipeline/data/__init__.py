"""Dataset registry and the two ways data reaches a training loop.

A registered dataset function returns a :class:`Source`: either resident arrays (digits, MNIST,
CIFAR: small enough to live on the device as tensors, batched by indexing, no per-item loop) or
an image-folder listing (Tiny ImageNet, ImageNet: decoded by DataLoader workers). :func:`load`
turns a source into :class:`~pipeline.data.tensors.Splits` with a validation split held out of
the training data.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from pipeline.registry import Registry

register_dataset = Registry("dataset", "register_dataset", skip=1)


class DataMissingError(FileNotFoundError):
    """A dataset's files are not where the config says; the message says where to put them."""


@dataclass
class Source:
    """What a dataset function returns.

    Resident: ``arrays = {"train": (x, y), "test": (x, y)}`` with ``x`` uint8 or float, shape
    ``[N, C, H, W]`` or ``[N, D]``, ``y`` int64 class labels ``[N]`` (or ``[N, heads]``).
    Folder: ``folders = {"train": [(path,
    label)...], "test": [...]}`` and ``image_size``.
    """

    num_classes: int
    input_shape: tuple[int, ...]
    mean: tuple[float, ...] = ()
    std: tuple[float, ...] = ()
    arrays: dict = field(default_factory=dict)
    folders: dict = field(default_factory=dict)
    scale: float = 1.0  # divide raw values by this before normalising (255 for uint8 images)
    heads: int = 1  # several classification heads: labels [N, heads], outputs heads*num_classes


def load(
    name: str,
    data_dir: str | Path,
    val_fraction: float = 0.1,
    subset: int = 0,
    device="cpu",
    dtype=None,
):
    """Load dataset ``name`` and hold out validation data: :class:`pipeline.data.tensors.Splits`."""
    from pipeline.data.tensors import make_splits

    source = register_dataset.get(name)(Path(data_dir))
    return make_splits(name, source, val_fraction, subset, device, dtype)
