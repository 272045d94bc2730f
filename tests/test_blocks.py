"""Every hyperparameter block a job reads from the config rejects a misspelt key the same way
(:func:`pipeline.config.from_block`): a :class:`ConfigError` naming ``where.key`` and the
allowed keys, before any work; a block of known keys builds its dataclass."""

from __future__ import annotations

import dataclasses
import string

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.config import ConfigError, checked_block, from_block
from pipeline.masks.study import mask_hparams
from pipeline.masks.train import MaskHparams
from pipeline.modelsym.stitching import StitchSettings
from pipeline.recovery.cluster import ClusterHparams
from pipeline.recovery.students import ExpandHparams, FitHparams
from pipeline.recovery.study import make_teacher
from pipeline.recovery.teachers import ToyTeacher
from pipeline.teleport.hparams import TeleportHparams
from pipeline.train.pruning import LotteryHparams

#: name -> (the dataclass, how a job builds it from a block, the key path it reports)
READERS = {
    "stitch_settings": (StitchSettings, StitchSettings.from_dict, "stitching.settings"),
    "mask_hparams": (MaskHparams, mask_hparams, "masks.hparams"),
    "expand": (ExpandHparams, ExpandHparams.from_dict, "expand"),
    "expand.fit": (FitHparams, lambda b: ExpandHparams.from_dict({"fit": b}), "expand.fit"),
    "expand.polish": (
        FitHparams,
        lambda b: ExpandHparams.from_dict({"polish": b}),
        "expand.polish",
    ),
    "cluster": (ClusterHparams, ClusterHparams.from_dict, "cluster"),
    "cluster.finetune": (
        FitHparams,
        lambda b: ClusterHparams.from_dict({"finetune": b}),
        "cluster.finetune",
    ),
    "cluster.final": (
        FitHparams,
        lambda b: ClusterHparams.from_dict({"final": b}),
        "cluster.final",
    ),
    "teacher": (
        ToyTeacher,
        lambda b: make_teacher({"kind": "toy", "input_dim": 2, "widths": [3], **b}),
        "teacher",
    ),
    "lottery": (LotteryHparams, lambda b: from_block(LotteryHparams, b, "lottery"), "lottery"),
    "teleport": (TeleportHparams, lambda b: from_block(TeleportHparams, b, "teleport"), "teleport"),
}

_keys = st.text(string.ascii_lowercase + "_", min_size=1, max_size=16)


@pytest.mark.parametrize("name", sorted(READERS))
@settings(max_examples=10, deadline=None)
@given(data=st.data())
def test_a_misspelt_key_is_a_config_error_naming_it(name, data):
    cls, read, where = READERS[name]
    allowed = sorted(f.name for f in dataclasses.fields(cls))
    # a real key with one letter changed, or any other name
    near = st.sampled_from(allowed).flatmap(
        lambda k: st.integers(0, len(k) - 1).map(
            lambda i: k[:i] + ("q" if k[i] != "q" else "z") + k[i + 1 :]
        )
    )
    # ("kind" selects the teacher maker, popped before the block is read)
    key = data.draw((near | _keys).filter(lambda k: k not in allowed + ["kind"]), label="key")
    with pytest.raises(ConfigError) as err:
        read({key: 1})
    message = str(err.value)
    assert f"{where}.{key}: unknown key; allowed: {', '.join(allowed)}" in message


@pytest.mark.parametrize("name", sorted(READERS))
def test_a_block_of_known_keys_builds_its_dataclass(name):
    cls, read, _ = READERS[name]
    defaults = {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.default is not dataclasses.MISSING and isinstance(f.default, (int, float, str))
    }
    assert defaults, f"{cls.__name__} has no scalar default to set"
    built = read(dict(defaults))
    if isinstance(built, tuple):  # make_teacher: (chain, params); the block is checked
        return
    inner = built if isinstance(built, cls) else getattr(built, name.split(".")[-1])
    assert isinstance(inner, cls)
    assert all(getattr(inner, k) == v for k, v in defaults.items())


def test_checked_block_names_every_unknown_key_and_passes_none_as_empty():
    assert checked_block(LotteryHparams, None, "lottery") == {}
    with pytest.raises(ConfigError) as err:
        checked_block(LotteryHparams, {"levls": 2, "fraktion": 0.1, "levels": 3}, "x.lottery")
    allowed = ", ".join(sorted(LotteryHparams.__dataclass_fields__))
    assert err.value.problems == [
        f"x.lottery.{k}: unknown key; allowed: {allowed}" for k in ("fraktion", "levls")
    ]
