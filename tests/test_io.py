"""Files the pipeline writes: atomic, and readable by whoever the umask lets read them."""

from __future__ import annotations

import contextlib
import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from strategies import examples

from pipeline import io


@contextlib.contextmanager
def umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _writers(tmp_path):
    """Every way the pipeline writes a file, each as (file, write function)."""

    def npz(path):
        with io.atomic_path(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, a=np.arange(3))

    def h5(path):
        with io.atomic_path(path, ".h5") as tmp, io.open_h5(tmp, "w") as f:
            f.create_dataset("a", data=np.arange(3))

    return [
        (tmp_path / "a.json", lambda p: io.write_json(p, {"a": 1})),
        (tmp_path / "a.pt", lambda p: io.save_torch(p, {"w": torch.ones(2)})),
        (tmp_path / "a.parquet", lambda p: io.write_parquet(p, pd.DataFrame({"a": [1, 2]}))),
        (tmp_path / "b.parquet", lambda p: io.write_columns(p, {"a": np.arange(2)})),
        (tmp_path / "a.npz", npz),
        (tmp_path / "a.h5", h5),
    ]


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o027, 0o077], ids=lambda m: f"umask{m:03o}")
def test_written_files_follow_the_umask(tmp_path, mask):
    with umask(mask):
        for path, write in _writers(tmp_path):
            write(path)
            assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask, path
    # nothing but the artifacts is left behind (no temporaries)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p, _ in _writers(tmp_path)
    )


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.json"
    io.write_json(path, {"a": 1})
    with pytest.raises(TypeError), umask(0o022):
        io.write_json(path, {"a": object()})
    assert io.read_json(path) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


@st.composite
def _tables(draw):
    """Numeric columns of each dtype a table may hold, and categorical columns (up to 300
    categories: int8 and int16 codes), of one drawn length."""
    rows = draw(st.integers(0, 40))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    columns, categories = {}, {}
    kinds = ["int64", "int32", "float64", "float32", "categorical"]
    for i, kind in enumerate(draw(st.lists(st.sampled_from(kinds), min_size=1, max_size=5))):
        name = f"c{i}"
        if kind == "categorical":
            names = [f"k{j}" for j in range(draw(st.sampled_from([1, 3, 127, 128, 300])))]
            categories[name] = tuple(names)
            columns[name] = rng.integers(0, len(names), rows)
        elif kind.startswith("int"):
            columns[name] = rng.integers(-(2**30), 2**30, rows).astype(kind)
        else:
            columns[name] = rng.normal(size=rows).astype(kind)
    return columns, categories


@settings(max_examples=examples(15, 150))
@given(_tables())
def test_write_columns_writes_what_pandas_writes_byte_for_byte(tmp_path_factory, table):
    """A training job writes its history without pandas: the file equals the DataFrame's own
    ``to_parquet`` (schema, pandas metadata, values), and reads back with the categoricals."""
    columns, categories = table
    tmp = tmp_path_factory.mktemp("columns")
    io.write_columns(tmp / "new.parquet", columns, categories)
    frame = pd.DataFrame(
        {
            name: pd.Categorical.from_codes(values, categories[name])
            if name in categories
            else values
            for name, values in columns.items()
        }
    )
    frame.to_parquet(tmp / "old.parquet", index=False)
    assert (tmp / "new.parquet").read_bytes() == (tmp / "old.parquet").read_bytes()
    pd.testing.assert_frame_equal(pd.read_parquet(tmp / "new.parquet"), frame)
