"""The config schema agrees with the hyperparameter dataclasses that read its blocks: the same
keys (so a typo fails at validation, before any job), no free-form blocks, and the defaults it
documents are the classes' defaults; and a config that misspells a key in any such block is
rejected naming it."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    CheckpointHparams,
    ConfigError,
    DatasetHparams,
    TrainHparams,
    load_schema,
    validate,
)
from pipeline.masks.train import MaskHparams
from pipeline.modelsym.stitching import StitchSettings
from pipeline.recovery.cluster import ClusterHparams
from pipeline.recovery.students import ExpandHparams, FitHparams
from pipeline.teleport.hparams import TeleportHparams
from pipeline.train.pruning import LotteryHparams

ROOT = Path(__file__).resolve().parents[1]

#: schema definition -> (dataclass, schema key -> field name where the study expands a list)
BLOCKS = {
    "train": (TrainHparams, {}),
    "checkpoints": (CheckpointHparams, {}),
    "dataset": (DatasetHparams, {}),
    "teleport": (TeleportHparams, {}),
    "lottery": (LotteryHparams, {"strategies": "strategy"}),  # one level table per strategy
    "mask_hparams": (MaskHparams, {}),
    "stitch_settings": (StitchSettings, {}),
    "recovery_cluster": (ClusterHparams, {}),
    "recovery_fit": (FitHparams, {}),
    "recovery_expand": (ExpandHparams, {}),
}


def _default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def _agrees(documented, default) -> bool:
    """A documented default equals the class's (nested blocks list only the keys they set)."""
    if dataclasses.is_dataclass(default):
        return all(getattr(default, k) == v for k, v in documented.items())
    if isinstance(default, tuple):
        return list(default) == documented
    return documented == default


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_block_is_its_dataclass(name):
    cls, renamed = BLOCKS[name]
    block = load_schema()["$defs"][name]
    assert block.get("additionalProperties") is False, f"{name}: free keys are not validated"
    keys = {renamed.get(k, k) for k in block["properties"]}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    assert keys == set(fields), (
        f"{name}: only in the schema {sorted(keys - set(fields))}, "
        f"only in {cls.__name__} {sorted(set(fields) - keys)}"
    )
    for key, spec in block["properties"].items():
        if "default" in spec:
            field = fields[renamed.get(key, key)]
            assert _agrees(spec["default"], _default(field)), (name, key)


def _paths_to(schema: dict, target: str, config: dict, path=()):
    """Paths in ``config`` to the dicts that the schema validates with ``$defs/target``."""
    # walk the embedded default: every dict whose keys are all fields of the block's class
    cls, renamed = BLOCKS[target]
    fields = {f.name for f in dataclasses.fields(cls)} | set(renamed)
    if isinstance(config, dict):
        if config and set(config) <= fields and len(set(config)) >= 2:
            yield path
        for k, v in config.items():
            yield from _paths_to(schema, target, v, (*path, k))


@pytest.mark.parametrize("name", ["train", "stitch_settings", "recovery_cluster", "mask_hparams"])
def test_a_misspelt_key_in_the_default_config_is_rejected_by_name(name):
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate(config)
    paths = list(_paths_to(load_schema(), name, config))
    assert paths, f"the default config has no {name} block"
    for path in paths:
        bad = copy.deepcopy(config)
        block = bad
        for k in path:
            block = block[k]
        block["lerning_rate"] = 1
        with pytest.raises(ConfigError, match="lerning_rate"):
            validate(bad)
