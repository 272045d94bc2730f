"""The config schema agrees with the hyperparameter dataclasses that read its blocks: the same
keys (so a typo fails at validation, before any job), no free-form blocks, and the defaults it
documents are the classes' defaults; and a config that misspells a key in any such block is
rejected naming it."""

from __future__ import annotations

import copy
import dataclasses
import importlib
from pathlib import Path

import pytest
import yaml

from pipeline.config import ConfigError, load_schema
from pipeline.studies import StudyKind, kind_class, kind_names, register_study_part, validate

ROOT = Path(__file__).resolve().parents[1]

KINDS = {name: kind_class(name) for name in kind_names()}
PARTS = {key: register_study_part.get(key)() for key in register_study_part.names()}
#: schema key -> dataclass field where the study expands a list (one level table per strategy)
RENAMED = {"lottery": {"strategies": "strategy"}}
#: schema keys that the code reading a block consumes before building its dataclass
DISPATCH = {"recovery_toy_teacher": {"kind"}}  # pipeline.recovery.study.make_teacher


def _declared_blocks() -> dict[str, type]:
    """``$defs`` name -> hyperparameter dataclass, as the study kinds and parts declare them."""
    out = {}
    for cls in [*KINDS.values(), *PARTS.values()]:
        for name, target in cls.blocks.items():
            module, attr = target.split(":")
            out[name] = getattr(importlib.import_module(module), attr)
    return out


#: schema definition -> (dataclass, schema key -> field name where the study expands a list)
BLOCKS = {name: (cls, RENAMED.get(name, {})) for name, cls in _declared_blocks().items()}


def _refs(schema: dict, node, seen: set[str]) -> set[str]:
    """Every ``$defs`` name reachable from ``node`` through ``$ref``."""
    if isinstance(node, dict):
        ref = node.get("$ref", "")
        if ref.startswith("#/$defs/") and ref[8:] not in seen:
            seen.add(ref[8:])
            _refs(schema, schema["$defs"][ref[8:]], seen)
        for value in node.values():
            _refs(schema, value, seen)
    elif isinstance(node, list):
        for value in node:
            _refs(schema, value, seen)
    return seen


def test_the_schema_has_one_block_per_registered_kind():
    """The schema's study kinds are the registered ones, each validated by the definition its
    class names, whose keys are the keys the class reads (the train kind's: its own and one
    per registered part)."""
    schema = load_schema()
    study = schema["$defs"]["study"]
    branches = {b["if"]["properties"]["kind"]["const"]: b["then"]["$ref"] for b in study["allOf"]}
    assert set(branches) == set(KINDS), f"allOf branches vs registered kinds: {sorted(branches)}"
    enum = study["properties"]["kind"]["enum"]
    assert set(enum) == set(KINDS), f"$defs/study kind enum {enum} vs registered {sorted(KINDS)}"
    for name, cls in KINDS.items():
        assert issubclass(cls, StudyKind)
        assert branches[name] == f"#/$defs/{cls.schema}", name
        block = schema["$defs"][cls.schema]
        assert block["properties"]["kind"] == {"const": name}
        assert block.get("additionalProperties") is False, name
        keys = set(cls.COMMON_KEYS) | set(cls.keys) | (set(PARTS) if name == "train" else set())
        assert set(block["properties"]) == keys, (
            f"{name}: only in the schema {sorted(set(block['properties']) - keys)}, "
            f"only in {cls.__name__} {sorted(keys - set(block['properties']))}"
        )


@pytest.mark.parametrize("name", sorted(KINDS))
def test_every_typed_block_a_kind_uses_is_declared(name):
    """Each hyperparameter block a kind (or, for train, a part) declares is used by its schema,
    and every block of the schema that a dataclass reads is declared by some kind."""
    schema = load_schema()
    cls = KINDS[name]
    reached = _refs(schema, schema["$defs"][cls.schema], set())
    declared = dict(cls.blocks)
    if name == "train":
        for part in PARTS.values():
            declared.update(part.blocks)
    assert set(declared) <= reached, sorted(set(declared) - reached)
    typed = {d for d in reached if d in BLOCKS}
    assert typed <= set(declared), f"{name} uses {sorted(typed - set(declared))} undeclared"


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
    keys = {renamed.get(k, k) for k in block["properties"]} - DISPATCH.get(name, set())
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


#: schema definitions that no hyperparameter dataclass reads, and why
STRUCTURAL = {
    "study": "dispatches on kind to the kinds' definitions",
    "model": "the options of a registered model builder (checked against its signature)",
    "figure": "a figure's kind and its table or metric (checked against the registries)",
    "resources": "scheduler resources, read by the workflow",
    "test_selection": "a free-text protocol name",
    "masks": "stages, comparisons and controls of the masks study (pipeline.masks.study)",
    "transfer": "the permuted-input transfer's settings (pipeline.masks.transfer)",
    "interpolation": "the 1D interpolation's grid (pipeline.teleport.interpolation)",
    "recovery_problem": "a teacher, its probe and per-problem overrides",
    "recovery_probe": "the probe's inputs (pipeline.recovery.study.make_probe; kinds checked by "
    "pipeline.recovery.plan.probe_problems)",
    "recovery_family": "the arguments of pipeline.recovery.plan.toy_family",
}


def test_every_schema_definition_is_a_kind_a_declared_block_or_structural():
    """A new definition in the schema is either a kind's block, a hyperparameter block some kind
    declares (and so checked against its dataclass above), or listed here with its reason."""
    defs = set(load_schema()["$defs"])
    kinds = {cls.schema for cls in KINDS.values()}
    assert defs == kinds | set(BLOCKS) | set(STRUCTURAL), (
        f"undeclared: {sorted(defs - kinds - set(BLOCKS) - set(STRUCTURAL))}; "
        f"gone: {sorted((kinds | set(BLOCKS) | set(STRUCTURAL)) - defs)}"
    )


@pytest.mark.parametrize("name", sorted(BLOCKS))
def test_every_hyperparameter_says_what_it_is(name):
    """Each field of a declared block has help text: its field's ``help`` metadata or the
    schema's description of its key (the config reference a user reads)."""
    cls, renamed = BLOCKS[name]
    props = load_schema()["$defs"][name]["properties"]
    key_of = {field: key for key, field in renamed.items()}
    silent = [
        f.name
        for f in dataclasses.fields(cls)
        if "help" not in f.metadata
        and "description" not in props.get(key_of.get(f.name, f.name), {})
    ]
    assert not silent, f"{name}: no help text for {silent}"
