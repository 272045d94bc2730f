"""Files: atomic writes, safe checkpoint loading, and readers that name the file they fail on.

Every artifact is written to a temporary name in its directory and renamed into place, so a
killed job never leaves a half-written file under the final name. Checkpoints are read with
``torch.load(..., weights_only=True)``: tensors and plain containers only, never arbitrary
pickled objects.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from pathlib import Path


class ArtifactError(RuntimeError):
    """A file the pipeline needs is missing, truncated, corrupt or of the wrong kind."""


@contextlib.contextmanager
def atomic_path(path: str | Path, suffix: str = ""):
    """Yield a temporary path beside ``path``; rename it onto ``path`` if the block succeeds.

    The temporary is hidden (``.name.<random><suffix>``, suffix ``.tmp`` by default) so a write
    killed half-way leaves no file that globs for finished artifacts (``*.npz``) pick up. It is
    created with mode 0666 less the umask, as any new file (``mkstemp``'s 0600 would hide
    results from collaborators sharing the project directory).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_hidden(path.parent, f".{path.name}.", suffix or ".tmp")
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _create_hidden(folder: Path, prefix: str, suffix: str) -> Path:
    """Create a new empty file ``folder/prefix<random>suffix`` (mode 0666 & ~umask)."""
    for _ in range(100):
        tmp = folder / f"{prefix}{secrets.token_hex(4)}{suffix}"
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"{folder}: no free temporary name {prefix}*{suffix}")


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def _json_default(obj):
    if hasattr(obj, "tolist"):
        return obj.tolist()
    if isinstance(obj, tuple | set):
        return list(obj)
    raise TypeError(f"cannot write {type(obj).__name__} to JSON")


def read_json(path: str | Path):
    path = Path(path)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise ArtifactError(f"{path}: not valid JSON ({err})") from None


def to_cpu(obj):
    """``obj`` with every tensor moved to the CPU (checkpoints never hold device tensors)."""
    import torch

    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


def save_torch(path: str | Path, obj) -> None:
    import torch

    with atomic_path(path, ".pt") as tmp:
        torch.save(to_cpu(obj), tmp)


def load_torch(path: str | Path, map_location="cpu"):
    """Load a checkpoint safely; refuse anything that needs arbitrary unpickling."""
    import pickle
    import zipfile

    import torch

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise ArtifactError(
            f"{path}: refused to load: the checkpoint holds objects other than tensors and plain "
            f"containers (weights_only=True), which could run code when unpickled ({err})"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as err:
        raise ArtifactError(f"{path}: truncated or corrupt checkpoint ({err})") from None


def write_parquet(path: str | Path, frame) -> None:
    with atomic_path(path, ".parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def write_columns(path: str | Path, columns: dict, categories: dict | None = None) -> None:
    """Write the file ``pd.DataFrame(frame).to_parquet(path, index=False)`` writes, byte for
    byte, without importing pandas (pyarrow's ``pa.array`` does, about 0.8 s, so a training job
    builds its arrays from buffers). ``columns``: name -> 1-D numpy array of ints or floats, in
    order; ``categories``: name -> the category names of a column whose values are codes (pandas
    reads it back as ``pd.Categorical.from_codes(codes, categories)``)."""
    import json
    from importlib.metadata import version

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    def from_numpy(values) -> pa.Array:
        values = np.ascontiguousarray(values)
        if values.ndim != 1 or values.dtype.kind not in "iuf":
            raise TypeError(f"{path}: a column must be 1-D ints or floats, not {values.dtype}")
        arrow = pa.from_numpy_dtype(values.dtype)
        return pa.Array.from_buffers(arrow, len(values), [None, pa.py_buffer(values)])

    pandas_version = version("pandas")
    # pandas 3 stores strings as large_string (its ``str`` dtype), pandas 2 (object) as string
    large = int(pandas_version.split(".")[0]) >= 3
    arrays, described = {}, []
    for name, values in columns.items():
        names = (categories or {}).get(name)
        if names is None:
            arrays[name] = from_numpy(values)
            kind = str(np.asarray(values).dtype)
            described.append((name, kind, kind, None))
            continue
        # pandas' smallest signed code type, as in pd.Categorical
        code = next(
            t for t in (np.int8, np.int16, np.int32, np.int64) if len(names) < np.iinfo(t).max
        )
        data = [str(n).encode() for n in names]
        offsets = np.cumsum([0] + [len(d) for d in data]).astype(np.int64 if large else np.int32)
        dictionary = pa.Array.from_buffers(
            pa.large_string() if large else pa.string(),
            len(data),
            [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(data))],
        )
        arrays[name] = pa.DictionaryArray.from_arrays(
            from_numpy(np.asarray(values).astype(code)), dictionary
        )
        meta = {"num_categories": len(names), "ordered": False}
        described.append((name, "categorical", np.dtype(code).name, meta))
    pandas = {
        "index_columns": [],
        "column_indexes": [],
        "columns": [
            {"name": n, "field_name": n, "pandas_type": p, "numpy_type": t, "metadata": m}
            for n, p, t, m in described
        ],
        "attributes": {},
        "creator": {"library": "pyarrow", "version": pa.__version__},
        "pandas_version": pandas_version,
    }
    table = pa.table(arrays).replace_schema_metadata({"pandas": json.dumps(pandas)})
    with atomic_path(path, ".parquet") as tmp:
        pq.write_table(table, tmp)


def read_parquet(path: str | Path, required: tuple[str, ...] = ()):
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ArtifactError(f"{path}: table not found")
    try:
        frame = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for bad files
        raise ArtifactError(f"{path}: not a readable parquet table ({err})") from None
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ArtifactError(f"{path}: table lacks columns {missing}")
    return frame


def open_h5(path: str | Path, mode: str = "r"):
    """``h5py.File`` with a clear error naming the file when it is missing or corrupt."""
    import h5py

    path = Path(path)
    if mode == "r" and not path.is_file():
        raise ArtifactError(f"{path}: HDF5 file not found")
    try:
        return h5py.File(path, mode)
    except OSError as err:
        raise ArtifactError(f"{path}: not a readable HDF5 file ({err})") from None


def h5_dataset(handle, key: str):
    """``handle[key][()]`` with a clear error naming file and key."""
    try:
        return handle[key][()]
    except KeyError:
        raise ArtifactError(f"{handle.filename}: HDF5 lacks dataset {key!r}") from None
    except OSError as err:
        raise ArtifactError(f"{handle.filename}: corrupt HDF5 dataset {key!r} ({err})") from None
