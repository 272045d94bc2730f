"""Features: a member's activations at its probe layers on a fixed probe set, in HDF5, streamed.

The probe set is the first ``size`` examples (all if 0) of one split in stored order: the same
examples, in the same order, for every member of every zoo over that dataset, so features of
two members are comparable sample by sample. Layout of ``features/{member}.h5``::

    labels   [N]                 int64 class labels
    logits   [N, outputs]        float32
    features/<layer>  [N, C, ...] float32, chunked along N (about 1 MiB per chunk)
    attrs: layers (JSON list of pipeline.modelsym.probes.Layer), member, split, size

Writing goes batch by batch into preallocated datasets and reading goes in row blocks
(:meth:`FeatureFile.blocks`), so no feature set is ever held whole in memory.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline import io
from pipeline.modelsym.probes import Layer, LayerError, feature_extractor, select_layers

CHUNK_BYTES = 1 << 20
BLOCK_BYTES = 256 << 20  # default budget for one block of rows when reading


class FeatureWriter:
    """Fill a feature file of ``total`` rows batch by batch (call inside ``io.atomic_path``)."""

    def __init__(self, handle, total: int, layers: list[Layer]):
        self.f, self.total, self.row = handle, total, 0
        self.f.attrs["layers"] = json.dumps([asdict(layer) for layer in layers])
        self.names = [layer.name for layer in layers]

    def _dataset(self, key, sample: np.ndarray):
        if key not in self.f:
            per_row = max(1, sample[0].nbytes)
            rows = max(1, min(self.total, CHUNK_BYTES // per_row))
            self.f.create_dataset(
                key,
                shape=(self.total, *sample.shape[1:]),
                dtype=sample.dtype,
                chunks=(rows, *sample.shape[1:]),
            )
        return self.f[key]

    def append(self, features: dict, logits=None, labels=None) -> None:
        n = None
        for name in self.names:
            arr = _numpy(features[name], np.float32)
            n = len(arr)
            self._dataset(f"features/{name}", arr)[self.row : self.row + n] = arr
        if logits is not None:
            arr = _numpy(logits, np.float32)
            self._dataset("logits", arr)[self.row : self.row + len(arr)] = arr
        if labels is not None:
            arr = _numpy(labels, np.int64)
            self._dataset("labels", arr)[self.row : self.row + len(arr)] = arr
        self.row += n or 0

    def close(self) -> None:
        if self.row != self.total:
            raise RuntimeError(f"{self.f.filename}: wrote {self.row} of {self.total} rows")


def _numpy(x, dtype) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=dtype)


def write_feature_file(path, features: dict, labels=None, layers: list[Layer] | None = None):
    """Write in-memory ``{layer: [N, C, ...]}`` arrays as a feature file (tests, benchmarks)."""
    names = list(features)
    if layers is None:
        layers = [Layer(n, "", -1, i, "relu", True) for i, n in enumerate(names)]
    total = len(next(iter(features.values())))
    with io.atomic_path(path, ".h5") as tmp, io.open_h5(tmp, "w") as f:
        writer = FeatureWriter(f, total, layers)
        writer.append(features, labels=labels)
        writer.close()
    return Path(path)


@torch.no_grad()
def extract_features(
    member,
    out,
    data_dir="data",
    split: str = "test",
    size: int = 0,
    layers="activations",
    batch_size: int = 256,
    device: str = "cpu",
) -> Path:
    """Write the features of member file ``member`` at ``layers`` (``"activations"`` or node
    names) on the probe set (``split``, first ``size`` examples) to ``out``."""
    from pipeline import devices
    from pipeline.modelsym.members import load_member, member_data

    dev = devices.resolve(device)
    model, record = load_member(member, dev)
    dtype = next(model.parameters()).dtype
    data = member_data(record, data_dir, dev, dtype)
    parts = {"train": data.train, "val": data.val, "test": data.test}
    if split not in parts or parts[split] is None:
        raise ValueError(
            f"probe split {split!r}: not one of the member's splits "
            f"({', '.join(k for k, v in parts.items() if v is not None)})"
        )
    part = parts[split]
    total = len(part) if not size else min(size, len(part))
    chosen = select_layers(model, layers)
    extractor = feature_extractor(model, [layer.name for layer in chosen]).eval()
    with io.atomic_path(out, ".h5") as tmp, io.open_h5(tmp, "w") as f:
        f.attrs.update({"member": str(member), "split": split, "size": total})
        writer = FeatureWriter(f, total, chosen)
        done = 0
        for x, y in part.eval_batches(batch_size):
            if done >= total:
                break
            x, y = x[: total - done], y[: total - done]
            logits, feats = extractor(x)
            writer.append(feats, logits, y)
            done += len(y)
        writer.close()
    return Path(out)


class FeatureFile:
    """Read a feature file layer by layer, in row blocks."""

    def __init__(self, path):
        self.path = Path(path)
        with io.open_h5(self.path) as f:
            raw = f.attrs.get("layers")
            if raw is None or "features" not in f:
                raise io.ArtifactError(f"{self.path}: not a feature file (no layers)")
            self.layers = [Layer(**d) for d in json.loads(raw)]
            self.shapes = {
                layer.name: tuple(f[f"features/{layer.name}"].shape) for layer in self.layers
            }
        self.by_name = {layer.name: layer for layer in self.layers}

    def __len__(self) -> int:
        return next(iter(self.shapes.values()))[0] if self.shapes else 0

    def layer(self, name: str) -> Layer:
        if name not in self.by_name:
            raise LayerError(f"{self.path}: no layer {name!r}; layers: {list(self.by_name)}")
        return self.by_name[name]

    def block_rows(self, name: str, budget: int = BLOCK_BYTES) -> int:
        per_row = 8 * int(np.prod(self.shapes[name][1:], dtype=np.int64))
        return max(1, min(len(self), budget // max(per_row, 1)))

    def blocks(
        self, name: str, rows: int | None = None, dtype=torch.float64, device="cpu", first=0
    ):
        """Yield ``(start, block)`` with ``block``: rows ``start ... start + b`` of layer ``name``
        as a ``[b, C, ...]`` tensor, from row ``first`` on."""
        self.layer(name)
        rows = rows or self.block_rows(name)
        with io.open_h5(self.path) as f:
            ds = f[f"features/{name}"]
            for start in range(first, len(self), rows):
                block = torch.from_numpy(ds[start : start + rows]).to(device=device, dtype=dtype)
                yield start, block

    def read(self, name: str, dtype=torch.float64) -> torch.Tensor:
        """The whole layer (small feature sets and tests only)."""
        return torch.cat([b for _, b in self.blocks(name, len(self), dtype)])

    def labels(self) -> np.ndarray:
        with io.open_h5(self.path) as f:
            return io.h5_dataset(f, "labels")
