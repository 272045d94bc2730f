"""The registered datasets, each reading its real on-disk format (nothing is downloaded).

Layouts under the configured ``data_dir`` (torchvision's: an existing torchvision download works):

- ``mnist``: ``MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]``
- ``fashion_mnist``: the same files under ``FashionMNIST/raw/``
- ``cifar10``: ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` (python pickles)
- ``cifar100``: ``cifar-100-python/{train,test}``
- ``tiny_imagenet``: ``tiny-imagenet-200/{wnids.txt,train/<wnid>/images/*.JPEG,val/...}`` where
  val is either the original ``val/images`` + ``val/val_annotations.txt`` or ``val/<wnid>/...``
- ``imagenet``: ``imagenet/{train,val}/<wnid>/*.JPEG`` (ImageFolder layout)

``digits`` ships with scikit-learn: 1,797 8x8 grey images, split 1,500 train / 297 test.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path

import numpy as np

from pipeline.data import DataMissingError, Source, register_dataset

IMAGE_SUFFIXES = {".jpeg", ".jpg", ".png"}


def _missing(dataset: str, path: Path, layout: str) -> DataMissingError:
    return DataMissingError(
        f"dataset {dataset!r}: {path} not found. Put the files in this layout under the "
        f"configured data_dir ({path.parent}):\n{layout}\n(nothing is downloaded at run time)"
    )


def bundled_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits file read directly, without importing scikit-learn (whose
    import costs a training job more than a second): ``(data (1797, 64) float64 in 0..16,
    target (1797,) int64)``, the values ``sklearn.datasets.load_digits()`` returns."""
    spec = importlib.util.find_spec("sklearn")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise DataMissingError("dataset 'digits' ships with scikit-learn, which is not installed")
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataMissingError(f"dataset 'digits': {path} not found in the scikit-learn install")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        table = np.loadtxt(f, delimiter=",")
    return table[:, :-1], table[:, -1].astype(np.int64)


@register_dataset("digits")
def digits(data_dir: Path) -> Source:
    """scikit-learn's bundled 8x8 digits, scaled to [0, 1]."""
    data, target = bundled_digits()
    x = (data / 16.0).reshape(-1, 1, 8, 8).astype(np.float64)
    y = target
    order = np.random.default_rng(0).permutation(len(y))
    test, train = order[:297], order[297:]
    mean, std = float(x[train].mean()), float(x[train].std())
    return Source(
        10, (1, 8, 8), (mean,), (std,), {"train": (x[train], y[train]), "test": (x[test], y[test])}
    )


# -- MNIST family (idx files) ------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """Read an idx file (optionally gzipped): big-endian magic, dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ValueError(f"{path}: not an unsigned-byte idx file")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: truncated idx file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(tuple(int(d) for d in dims)).copy()


def _idx_pair(dataset: str, root: Path, prefix: str):
    files = []
    for kind in ("images-idx3", "labels-idx1"):
        base = root / f"{prefix}-{kind}-ubyte"
        path = next((p for p in (base, base.with_name(base.name + ".gz")) if p.is_file()), None)
        if path is None:
            raise _missing(
                dataset,
                base,
                f"  {root.relative_to(root.parents[1])}/{{train,t10k}}-"
                "{images-idx3,labels-idx1}-ubyte[.gz]",
            )
        files.append(read_idx(path))
    images, labels = files
    return images[:, None, :, :], labels.astype(np.int64)


def _mnist_like(dataset: str, folder: str, data_dir: Path, mean: float, std: float) -> Source:
    root = data_dir / folder / "raw"
    return Source(
        10,
        (1, 28, 28),
        (mean,),
        (std,),
        {
            "train": _idx_pair(dataset, root, "train"),
            "test": _idx_pair(dataset, root, "t10k"),
        },
        scale=255.0,
    )


@register_dataset("mnist")
def mnist(data_dir: Path) -> Source:
    """MNIST from torchvision's raw idx files."""
    return _mnist_like("mnist", "MNIST", data_dir, 0.1307, 0.3081)


@register_dataset("fashion_mnist")
def fashion_mnist(data_dir: Path) -> Source:
    """Fashion-MNIST from torchvision's raw idx files."""
    return _mnist_like("fashion_mnist", "FashionMNIST", data_dir, 0.2860, 0.3530)


# -- CIFAR (python pickles, read with a restricted unpickler) -----------------------------------
class _ArraysOnly(pickle.Unpickler):
    """Unpickle CIFAR batches: dicts, lists, bytes and numpy arrays; nothing that runs code."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how protocol-2 pickles store byte strings; pure
    }

    def find_class(self, module, name):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to unpickle {module}.{name}")


def _cifar_batch(path: Path, label_key: bytes):
    try:
        with open(path, "rb") as f:
            batch = _ArraysOnly(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, KeyError, ValueError) as err:
        raise pickle.UnpicklingError(f"{path}: not a CIFAR batch ({err})") from None
    data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    return data, np.asarray(batch[label_key], dtype=np.int64)


def _cifar(dataset, data_dir, folder, train_files, test_file, label_key, classes, mean, std):
    root = data_dir / folder
    layout = f"  {folder}/{{{','.join(train_files)},{test_file}}}"
    parts = []
    for name in [*train_files, test_file]:
        if not (root / name).is_file():
            raise _missing(dataset, root / name, layout)
        parts.append(_cifar_batch(root / name, label_key))
    train = tuple(np.concatenate(a) for a in zip(*parts[:-1], strict=True))
    return Source(classes, (3, 32, 32), mean, std, {"train": train, "test": parts[-1]}, scale=255.0)


CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)


@register_dataset("cifar10")
def cifar10(data_dir: Path) -> Source:
    """CIFAR-10 from the python-pickle batches."""
    files = [f"data_batch_{i}" for i in range(1, 6)]
    return _cifar(
        "cifar10",
        data_dir,
        "cifar-10-batches-py",
        files,
        "test_batch",
        b"labels",
        10,
        CIFAR_MEAN,
        CIFAR_STD,
    )


@register_dataset("cifar100")
def cifar100(data_dir: Path) -> Source:
    """CIFAR-100 (fine labels) from the python-pickle files."""
    return _cifar(
        "cifar100",
        data_dir,
        "cifar-100-python",
        ["train"],
        "test",
        b"fine_labels",
        100,
        (0.5071, 0.4865, 0.4409),
        (0.2673, 0.2564, 0.2762),
    )


# -- image folders ----------------------------------------------------------------------------
def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@register_dataset("tiny_imagenet")
def tiny_imagenet(data_dir: Path) -> Source:
    """Tiny ImageNet (200 classes, 64x64), original or class-folder validation layout."""
    root = data_dir / "tiny-imagenet-200"
    layout = (
        "  tiny-imagenet-200/wnids.txt\n  tiny-imagenet-200/train/<wnid>/images/*.JPEG\n"
        "  tiny-imagenet-200/val/images/*.JPEG + val/val_annotations.txt  (or val/<wnid>/*.JPEG)"
    )
    if not (root / "wnids.txt").is_file():
        raise _missing("tiny_imagenet", root / "wnids.txt", layout)
    wnids = (root / "wnids.txt").read_text().split()
    label = {w: i for i, w in enumerate(wnids)}
    train = [(str(p), label[w]) for w in wnids for p in _images(root / "train" / w)]
    notes = root / "val" / "val_annotations.txt"
    if notes.is_file():
        rows = [line.split("\t")[:2] for line in notes.read_text().splitlines() if line.strip()]
        test = [(str(root / "val" / "images" / f), label[w]) for f, w in rows]
    else:
        test = [(str(p), label[w]) for w in wnids for p in _images(root / "val" / w)]
    if not train or not test:
        raise _missing("tiny_imagenet", root / "train", layout)
    return Source(
        len(wnids),
        (3, 64, 64),
        IMAGENET_MEAN,
        IMAGENET_STD,
        folders={"train": train, "test": test},
        scale=255.0,
    )


@register_dataset("imagenet")
def imagenet(data_dir: Path) -> Source:
    """ImageNet-1k in the ImageFolder layout, centre-cropped to 224x224."""
    root = data_dir / "imagenet"
    layout = "  imagenet/train/<wnid>/*.JPEG\n  imagenet/val/<wnid>/*.JPEG"
    if not (root / "train").is_dir() or not (root / "val").is_dir():
        raise _missing("imagenet", root / "train", layout)
    wnids = sorted(p.name for p in (root / "train").iterdir() if p.is_dir())
    label = {w: i for i, w in enumerate(wnids)}

    def listing(split):
        return [(str(p), label[w]) for w in wnids for p in _images(root / split / w)]

    return Source(
        len(wnids),
        (3, 224, 224),
        IMAGENET_MEAN,
        IMAGENET_STD,
        folders={"train": listing("train"), "test": listing("val")},
        scale=255.0,
    )
