"""Every dataset loads from tiny files written here in its real on-disk format."""

from __future__ import annotations

import gzip
import os
import pickle

import numpy as np
import pytest
import torch

from pipeline.data import DataMissingError, load
from pipeline.data.tensors import augment

RNG = np.random.default_rng(0)


def write_idx(path, array, gz=False):
    header = bytes([0, 0, 0x08, array.ndim]) + np.array(array.shape, dtype=">i4").tobytes()
    data = header + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    (gzip.open if gz else open)(path, "wb").write(data)


@pytest.mark.parametrize(
    "name,folder,gz", [("mnist", "MNIST", False), ("fashion_mnist", "FashionMNIST", True)]
)
def test_mnist_family_idx_files(tmp_path, name, folder, gz):
    raw = tmp_path / folder / "raw"
    images = {s: RNG.integers(0, 256, (n, 28, 28)) for s, n in (("train", 50), ("t10k", 12))}
    labels = {s: RNG.integers(0, 10, len(images[s])) for s in images}
    for s in images:
        suffix = ".gz" if gz else ""
        write_idx(raw / f"{s}-images-idx3-ubyte{suffix}", images[s], gz)
        write_idx(raw / f"{s}-labels-idx1-ubyte{suffix}", labels[s], gz)
    data = load(name, tmp_path, val_fraction=0.2, dtype=torch.float64)
    assert len(data.train) == 40 and len(data.val) == 10 and len(data.test) == 12
    assert data.input_shape == (1, 28, 28) and data.num_classes == 10
    x, y = next(data.test.eval_batches(100))
    assert torch.equal(y, torch.as_tensor(labels["t10k"]))
    mean, std = (0.1307, 0.3081) if name == "mnist" else (0.2860, 0.3530)
    expected = (images["t10k"][:, None] / 255.0 - mean) / std
    assert torch.allclose(x, torch.as_tensor(expected), atol=1e-12)


def _cifar_pickle(path, n, label_key):
    batch = {
        b"data": RNG.integers(0, 256, (n, 3072)).astype(np.uint8),
        label_key: RNG.integers(0, 10, n).tolist(),
        b"batch_label": b"x",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        pickle.dump(batch, f, protocol=2)
    return batch


def test_cifar10_and_cifar100_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    batches = [_cifar_pickle(root / f"data_batch_{i}", 8, b"labels") for i in range(1, 6)]
    test = _cifar_pickle(root / "test_batch", 6, b"labels")
    data = load("cifar10", tmp_path, val_fraction=0.0)
    assert len(data.train) == 40 and data.val is None and data.input_shape == (3, 32, 32)
    x, y = next(data.test.eval_batches(10))
    assert y.tolist() == test[b"labels"]
    raw = torch.as_tensor(test[b"data"].reshape(6, 3, 32, 32) / 255.0)
    assert torch.allclose(x.double()[:, 0] * 0.2470 + 0.4914, raw[:, 0], atol=1e-5)
    assert sum(len(b[b"labels"]) for b in batches) == 40
    root = tmp_path / "cifar-100-python"
    _cifar_pickle(root / "train", 10, b"fine_labels")
    _cifar_pickle(root / "test", 4, b"fine_labels")
    assert load("cifar100", tmp_path, val_fraction=0.1).num_classes == 100


class _Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned > pwned.txt",))


def test_cifar_pickle_that_runs_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "cifar-10-batches-py"
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        root.mkdir(exist_ok=True)
        with open(root / name, "wb") as f:
            pickle.dump({b"data": _Exploit(), b"labels": [0]}, f)
    with pytest.raises(pickle.UnpicklingError, match="data_batch_1.*refusing"):
        load("cifar10", tmp_path)
    assert not (tmp_path / "pwned.txt").exists()


def _jpeg(path, size, seed):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (*size[::-1], 3)).astype(np.uint8)
    Image.fromarray(pixels).save(path, format="JPEG")


def test_tiny_imagenet_original_layout(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n01443537", "n01629819", "n01641577"]
    root.mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for i, w in enumerate(wnids):
        for j in range(4):
            _jpeg(root / "train" / w / "images" / f"{w}_{j}.JPEG", (64, 64), 10 * i + j)
    notes = []
    for j in range(5):
        _jpeg(root / "val" / "images" / f"val_{j}.JPEG", (64, 64), 100 + j)
        notes.append(f"val_{j}.JPEG\t{wnids[j % 3]}\t0\t0\t64\t64")
    (root / "val" / "val_annotations.txt").write_text("\n".join(notes) + "\n")
    data = load("tiny_imagenet", tmp_path, val_fraction=0.25)
    data.test.workers = data.train.workers = 0
    assert (len(data.train), len(data.val), len(data.test)) == (9, 3, 5)
    x, y = next(data.test.eval_batches(8))
    assert x.shape == (5, 3, 64, 64) and y.tolist() == [0, 1, 2, 0, 1]
    xb, yb = next(data.train.train_batches(4, True, seed=1, epoch=0, augment_images=True))
    assert xb.shape == (4, 3, 64, 64)


def test_imagenet_folder_layout_centre_crops(tmp_path):
    root = tmp_path / "imagenet"
    for split, n in (("train", 3), ("val", 2)):
        for i, w in enumerate(["n0001", "n0002"]):
            for j in range(n):
                _jpeg(root / split / w / f"{j}.JPEG", (300, 250), i * 10 + j)
    data = load("imagenet", tmp_path, val_fraction=0.0)
    data.test.workers = 0
    x, y = next(data.test.eval_batches(10))
    assert x.shape == (4, 3, 224, 224) and sorted(y.tolist()) == [0, 0, 1, 1]
    assert data.num_classes == 2


@pytest.mark.parametrize(
    "name,where",
    [
        ("mnist", "MNIST/raw"),
        ("cifar10", "cifar-10-batches-py"),
        ("cifar100", "cifar-100-python"),
        ("tiny_imagenet", "tiny-imagenet-200"),
        ("imagenet", "imagenet"),
    ],
)
def test_missing_dataset_says_where_to_put_it(tmp_path, name, where):
    with pytest.raises(DataMissingError) as err:
        load(name, tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in str(err.value) and where in str(err.value)


def test_digits_split_and_batch_order_are_reproducible():
    a = load("digits", "unused", val_fraction=0.1)
    b = load("digits", "unused", val_fraction=0.1)
    assert (len(a.train), len(a.val), len(a.test)) == (1350, 150, 297)
    batches_a = [y for _, y in a.train.train_batches(64, True, seed=5, epoch=3)]
    batches_b = [y for _, y in b.train.train_batches(64, True, seed=5, epoch=3)]
    assert all(torch.equal(p, q) for p, q in zip(batches_a, batches_b, strict=True))
    other = [y for _, y in a.train.train_batches(64, True, seed=5, epoch=4)]
    assert not torch.equal(batches_a[0], other[0])
    resumed = [y for _, y in a.train.train_batches(64, True, seed=5, epoch=3, start=7)]
    assert all(torch.equal(p, q) for p, q in zip(batches_a[7:], resumed, strict=True))


def test_bundled_digits_equal_scikit_learns_loader():
    from sklearn.datasets import load_digits

    from pipeline.data.sources import bundled_digits

    data, target = bundled_digits()
    bunch = load_digits()
    assert data.dtype == bunch.data.dtype and np.array_equal(data, bunch.data)
    assert np.array_equal(target, bunch.target)


def test_augment_is_a_translation_and_flip():
    x = torch.arange(2 * 1 * 6 * 6, dtype=torch.float64).reshape(2, 1, 6, 6) + 1
    out = augment(x, torch.Generator().manual_seed(0), pad=2)
    assert out.shape == x.shape
    for img, src in zip(out, x, strict=True):
        nonzero = img[img != 0]
        assert set(nonzero.tolist()) <= set(src.flatten().tolist())
        assert torch.equal(augment(x, torch.Generator().manual_seed(0), pad=2), out)
