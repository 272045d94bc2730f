"""Files the pipeline writes: atomic, and readable by whoever the umask lets read them."""

from __future__ import annotations

import contextlib
import os
import stat

import numpy as np
import pandas as pd
import pytest
import torch

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
