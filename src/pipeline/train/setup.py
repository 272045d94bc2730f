"""What every training (and every reload) of a run's model starts from: the device, the dtype,
the run's dataset on that device, and its model - built the one way, so a zoo member, a lottery
level or a mask study's network is the network ``train_run`` trained."""

from __future__ import annotations

from pipeline import devices
from pipeline.config import DatasetHparams, TrainHparams


def placed_data(hparams: dict, device: str = "cpu", data_dir: str = "data"):
    """``(device, dtype, data)`` for a run's hyperparameters: its dataset's splits
    (:func:`pipeline.data.load`) on ``device`` in the run's ``train.dtype``."""
    from pipeline.data import load

    h = TrainHparams(**hparams.get("train", {}))
    d = DatasetHparams(**hparams["dataset"])
    dev = devices.resolve(device)
    dtype = devices.dtype(h.dtype, "train.dtype")
    return dev, dtype, load(d.name, data_dir, d.val_fraction, d.subset, dev, dtype)


def run_model(hparams: dict, data, seed: int, dtype, device):
    """The run's model (``hparams["model"]``: name and options) for ``data``'s input shape and
    outputs, initialised from ``seed``, on ``device``."""
    from pipeline.models import build

    options = dict(hparams["model"])
    name = options.pop("name")
    return build(name, data.input_shape, data.num_outputs, options, seed, dtype).to(device)
