"""Extract: a run's checkpoints -> one HDF5 file of ``[T, ...]`` time series.

Layout (T = number of checkpoints, in step order)::

    steps [T], epochs [T]
    params/<name>        [T, ...]  every parameter (weights, biases, BN affine)
    buffers/<name>       [T, ...]  model buffers (BN running statistics)
    optimizer/<param>/<key> [T, ...]  optimizer state per parameter (momentum_buffer,
                                      exp_avg, ...), NaN before the optimizer created it
    metrics/<name>       [T]       eval metrics stored with the checkpoint (NaN where absent)
    attrs: hparams (JSON), run, structure (JSON neuron structure), input_shape, num_classes

Datasets are chunked along time and gzip-compressed; checkpoints are read one at a time, so
memory stays at one checkpoint whatever T is.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline import io
from pipeline.layout import RunPaths


def _chunks(shape, itemsize, t):
    per = max(1, int(np.prod(shape, dtype=np.int64)) * itemsize)
    return (max(1, min(t, (1 << 20) // per)), *shape)


class _BufferedWriter:
    """Writes ``[T, ...]`` datasets a whole chunk of rows at a time (a row-by-row write into a
    compressed chunk would decompress and recompress it for every row)."""

    def __init__(self, handle, total: int):
        self.f, self.total = handle, total
        self.pending: dict[str, tuple[int, list]] = {}
        self.chunk_rows: dict[str, int] = {}

    def put(self, key: str, i: int, value) -> None:
        arr = value.detach().cpu().numpy()
        if key not in self.f:
            self.f.create_dataset(
                key,
                shape=(self.total, *arr.shape),
                dtype=arr.dtype,
                chunks=_chunks(arr.shape, arr.itemsize, self.total),
                compression="gzip",
                compression_opts=4,
                fillvalue=np.nan if arr.dtype.kind == "f" else 0,
            )
            self.chunk_rows[key] = self.f[key].chunks[0]
        start, rows = self.pending.get(key, (i, []))
        if rows and start + len(rows) != i:  # a gap (state absent at some checkpoints)
            self._write(key, start, rows)
            start, rows = i, []
        rows.append(arr)
        self.pending[key] = (start, rows)
        if len(rows) == self.chunk_rows[key]:
            self._write(key, start, rows)
            del self.pending[key]

    def _write(self, key, start, rows) -> None:
        self.f[key][start : start + len(rows)] = np.stack(rows)

    def flush(self) -> None:
        for key, (start, rows) in self.pending.items():
            self._write(key, start, rows)
        self.pending.clear()


def extract_run(run_dir: str | Path, out: str | Path) -> Path:
    """Write the HDF5 time series of the run in ``run_dir`` to ``out`` (atomically)."""
    import torch

    paths, out = RunPaths(Path(run_dir)), Path(out)
    manifest = io.read_json(paths.manifest)
    hparams = io.read_json(paths.hparams)
    if not manifest:
        raise io.ArtifactError(f"{paths.manifest}: lists no checkpoints")
    manifest = sorted(manifest, key=lambda e: e["step"])
    T = len(manifest)
    metric_names = sorted({k for e in manifest for k in e["metrics"]})
    with io.atomic_path(out, ".h5") as tmp, io.open_h5(tmp, "w") as f:
        f.attrs["hparams"] = json.dumps(hparams)
        f.attrs["run"] = str(run_dir)
        f.create_dataset("steps", data=np.array([e["step"] for e in manifest], dtype=np.int64))
        f.create_dataset("epochs", data=np.array([e["epoch"] for e in manifest], dtype=np.int64))
        for name in metric_names:
            f.create_dataset(
                f"metrics/{name}",
                data=np.array([e["metrics"].get(name, np.nan) for e in manifest], dtype=np.float64),
            )

        writer = _BufferedWriter(f, T)
        names = None
        for i, entry in enumerate(manifest):
            state = io.load_torch(paths.root / entry["file"])
            if names is None:
                info = state["info"]
                names = info["param_names"]
                f.attrs["structure"] = info["structure"] or ""
                f.attrs["input_shape"] = info["input_shape"]
                f.attrs["num_classes"] = info["num_classes"]
            for key, value in state["model"].items():
                if value.dtype == torch.int64 and value.ndim == 0:
                    continue  # BN's num_batches_tracked
                writer.put(f"{'params' if key in names else 'buffers'}/{key}", i, value)
            for index, buffers in state["optimizer"]["state"].items():
                for key, value in buffers.items():
                    if torch.is_tensor(value) and value.ndim > 0:
                        writer.put(f"optimizer/{names[int(index)]}/{key}", i, value)
        writer.flush()
    return out
