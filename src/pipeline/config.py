"""Typed hyperparameters, config validation, and the expansion of studies into named runs.

OpenLTH-style: each hyperparameter is a dataclass field with a default and help text. A run's
directory name is built from the study's *swept* keys only (``lr~0.1/wd~0.0005/seed~1``), and the
hyperparameters handed to Snakemake as ``params`` are only those that differ from the defaults,
so adding a new field with a default neither renames old runs nor re-runs them.

Imports nothing heavy: Snakemake calls this while it parses the workflow.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from pipeline.registry import Registry

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "config" / "schema" / "config.schema.yaml"


def _h(text: str, **kw):
    return field(metadata={"help": text}, **kw)


def checked_block(cls, block: dict | None, where: str) -> dict:
    """``block`` (a config dict; ``None``: empty) if every key is a field of dataclass ``cls``;
    else a :class:`ConfigError` naming each unknown key as ``where.key`` and the allowed keys."""
    block = {} if block is None else block
    allowed = sorted(f.name for f in fields(cls))
    unknown = sorted(set(block) - set(allowed))
    if unknown:
        raise ConfigError(
            [f"{where}.{key}: unknown key; allowed: {', '.join(allowed)}" for key in unknown]
        )
    return block


def from_block(cls, block: dict | None, where: str):
    """The hyperparameter dataclass ``cls`` from a config block (see :func:`checked_block`)."""
    return cls(**checked_block(cls, block, where))


@dataclass(frozen=True)
class TrainHparams:
    optimizer: str = _h("sgd or adam", default="sgd")
    lr: float = _h("learning rate", default=0.1)
    momentum: float = _h("heavy-ball momentum (SGD)", default=0.0)
    dampening: float = _h("momentum dampening (SGD)", default=0.0)
    nesterov: bool = _h("Nesterov momentum (SGD)", default=False)
    wd: float = _h("coupled (L2) weight decay", default=0.0)
    wd_on: str = _h(
        "all (every parameter) or weights (only parameters named *weight*: no biases, no "
        "BatchNorm shifts)",
        default="all",
    )
    beta1: float = _h("Adam beta1", default=0.9)
    beta2: float = _h("Adam beta2", default=0.999)
    adam_eps: float = _h("Adam epsilon", default=1e-8)
    batch_size: int = _h("minibatch size", default=64)
    eval_batch_size: int = _h("batch size for evaluation passes", default=1024)
    epochs: int = _h("training epochs", default=1)
    drop_last: bool = _h("drop the last incomplete minibatch of an epoch", default=True)
    schedule: str = _h("constant, step, multistep or plateau (per epoch)", default="constant")
    step_size: int = _h("epochs between drops (step schedule)", default=30)
    milestones: tuple[int, ...] = _h("epochs at which to drop (multistep)", default=())
    gamma: float = _h("lr factor at each drop (step/multistep)", default=0.1)
    plateau_factor: float = _h("lr factor on a plateau", default=0.1)
    plateau_patience: int = _h("epochs without improvement before a drop", default=10)
    plateau_metric: str = _h(
        "val_accuracy, val_loss, test_accuracy or test_loss", default="val_accuracy"
    )
    loss: str = _h("ce (softmax cross-entropy) or mse (to one-hot targets)", default="ce")
    dtype: str = _h("float32 or float64", default="float32")
    augment: bool = _h("random crop (pad 4) and horizontal flip on image data", default=False)
    on_nan: str = _h("error: stop with an error; record: end the run as diverged", default="error")
    mechanics: bool = _h("log the per-step per-neuron trace for conservation laws", default=False)


@dataclass(frozen=True)
class CheckpointHparams:
    step0: bool = _h("checkpoint before the first update", default=True)
    every_steps: int = _h("checkpoint every k optimizer steps (0: never)", default=0)
    epoch_end: bool = _h("checkpoint at the end of every epoch", default=True)
    log_spaced: int = _h("number of log-spaced checkpoint steps over the run (0: none)", default=0)
    keep_last: int = _h(
        "keep only the newest k checkpoint files (0: all); for resume only", default=0
    )


@dataclass(frozen=True)
class DatasetHparams:
    name: str = _h("dataset registry name", default="digits")
    val_fraction: float = _h("fraction of the training split held out for validation", default=0.1)
    subset: int = _h("use only the first n training examples (0: all)", default=0)


SECTIONS = {"train": TrainHparams, "checkpoints": CheckpointHparams, "dataset": DatasetHparams}

#: Hyperparameter sections that sciences add (e.g. ``teleport``): ``@register_section(name)`` on a
#: function returning the section's dataclass, in a module that imports nothing heavy.
register_section = Registry("hyperparameter section", "register_section")


def sections(study: dict | None = None) -> dict[str, type]:
    """The hyperparameter sections of a study: the core ones, plus each registered section the
    study uses (as a block, or in its sweep). Without a study: every section."""
    out = dict(SECTIONS)
    used = None
    if study is not None:
        used = set(study) | {k.split(".", 1)[0] for k in study.get("sweep", {})}
    for name in register_section.names():
        if used is None or name in used:
            out[name] = register_section.get(name)()
    return out


class ConfigError(ValueError):
    """A config problem, with every offending key named."""

    def __init__(self, problems: list[str], source: str = "config"):
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"invalid {source}:\n{lines}")


def defaults(section: str) -> dict:
    return asdict(sections()[section]())


# -- validation ---------------------------------------------------------------------------------
def load_schema() -> dict:
    return yaml.safe_load(SCHEMA_PATH.read_text())


def _path(parts) -> str:
    return ".".join(str(p) for p in parts) or "<root>"


def schema_problems(config: dict) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(load_schema())
    problems = []
    for err in sorted(validator.iter_errors(config), key=lambda e: list(map(str, e.path))):
        where = _path(err.absolute_path)
        if err.validator == "additionalProperties":
            allowed = sorted(err.schema.get("properties", {}))
            extra = sorted(set(err.instance) - set(allowed))
            for key in extra:
                where = _path([*err.absolute_path, key])
                problems.append(f"{where}: unknown key; allowed: {', '.join(allowed)}")
        elif err.validator == "enum":
            problems.append(
                f"{where}: {err.instance!r} is not allowed; allowed: "
                + ", ".join(map(str, err.validator_value))
            )
        elif err.validator in ("if", "then", "allOf"):
            continue  # the nested errors are reported on their own
        else:
            problems.append(f"{where}: {err.message}")
    return problems


def train_problems(name: str, study: dict) -> list[str]:
    """Problems of a ``train`` study block: its models, dataset, metrics and sweep."""
    from pipeline.data import register_dataset
    from pipeline.metric_registry import register_metric
    from pipeline.models import register_model

    where = f"studies.{name}"
    out = []
    swept_models = study.get("sweep", {}).get("model")
    model = study.get("model", {})
    if "model" in study:
        out += model_problems(f"{where}.model", model)
    elif not swept_models:
        out.append(f"{where}: needs a model (or a sweep over model)")
    if isinstance(swept_models, list):
        labels = []
        for i, m in enumerate(swept_models):
            if not isinstance(m, dict):
                out.append(f"{where}.sweep.model[{i}]: expected a model block {{name: ...}}")
                continue
            out += model_problems(f"{where}.sweep.model[{i}]", m)
            labels.append(str(m.get("label", m.get("name"))))
        if len(set(labels)) != len(labels):
            out.append(f"{where}.sweep.model: two models share a name; give each a `label`")
    try:
        register_dataset.entry(study.get("dataset", {}).get("name", "digits"))
    except KeyError as err:
        out.append(f"{where}.dataset.name: {err.args[0]}")
    for metric in study.get("metrics", []):
        if metric not in register_metric.names():
            out.append(
                f"{where}.metrics: unknown metric {metric!r}; allowed: "
                + ", ".join(register_metric.names())
            )
    for key, values in study.get("sweep", {}).items():
        try:
            section, leaf = _sweep_target(key)
        except KeyError as err:
            out.append(f"{where}.sweep.{key}: {err.args[0]}")
            continue
        if section == "model" and leaf not in ("name", None) and "name" in model:
            try:
                if leaf not in register_model.entry(model["name"]).params:
                    out.append(
                        f"{where}.sweep.{key}: model {model['name']!r} has no option {leaf!r}"
                    )
            except KeyError:
                pass
        if not isinstance(values, list) or not values:
            out.append(f"{where}.sweep.{key}: expected a non-empty list of values")
    train = {**defaults("train"), **study.get("train", {})}
    needs_trace = {"gradient_norm"} & set(study.get("metrics", []))
    if needs_trace and not train["mechanics"]:
        out.append(f"{where}.metrics: {sorted(needs_trace)} need train.mechanics: true")
    if train["mechanics"]:
        ckpt = {**defaults("checkpoints"), **study.get("checkpoints", {})}
        if not ckpt["step0"]:
            out.append(f"{where}.checkpoints.step0: mechanics studies need the step-0 checkpoint")
    leaves = [_name_key(k) for k in study.get("sweep", {})]
    dup = {x for x in leaves if leaves.count(x) > 1}
    if dup or "seed" in leaves:
        clash = sorted(dup | ({"seed"} & set(leaves)))
        out.append(f"{where}.sweep: run names need distinct key names; clash: {clash}")
    return out


def selection_problems(where: str, blocks: list[tuple[str, dict]], study: dict) -> list[str]:
    """Model selection on the test split (a reduce-on-plateau schedule reading test_* metrics)
    is refused unless the study (at config key ``where``) declares ``test_selection``: the
    original protocol it reproduces (its results are then marked test-selected). Selection on
    validation metrics needs a validation split. ``blocks``: (config key of a train block, the
    train study block it belongs to)."""
    out = []
    for key, block in blocks:
        metrics = set()
        try:
            runs = expand_runs("check", block)
        except (KeyError, ValueError, TypeError):
            continue  # a malformed sweep: its own problem is reported elsewhere
        for run in runs:
            train, data = run.hparams["train"], run.hparams["dataset"]
            if train["schedule"] == "plateau":
                metrics.add((train["plateau_metric"], data["val_fraction"] > 0))
        if any(m.startswith("test_") for m, _ in metrics) and not study.get("test_selection"):
            out.append(
                f"{key}.plateau_metric: the learning-rate schedule reads the test split "
                f"({', '.join(sorted(m for m, _ in metrics if m.startswith('test_')))}); select "
                "on val_accuracy or val_loss (dataset.val_fraction > 0), or declare "
                f"{where}.test_selection: <the original protocol this reproduces> (its "
                "results are then marked test-selected)"
            )
        if any(m.startswith("val_") and not has_val for m, has_val in metrics):
            out.append(
                f"{key}.plateau_metric: a val_* metric needs a validation split "
                f"({where}.dataset.val_fraction > 0)"
            )
    return out


def selection_note(study: dict) -> str:
    """The note marking a study's results as selected on the test split ('' if they are not)."""
    protocol = study.get("test_selection")
    return f"Test-selected (reproduces {protocol}). " if protocol else ""


def figure_problems(where: str, study: dict) -> list[str]:
    """Figure kinds must be registered; a figure reads a metric or a table, not both, and a
    figure kind registered with ``tables=(...)`` draws only those tables."""
    from pipeline.metric_registry import register_metric
    from pipeline.plots import register_figure

    out, kinds, metrics = [], register_figure.names(), register_metric.names()
    for fig, spec in study.get("figures", {}).items():
        metric = spec.get("metric")
        if spec["kind"] not in kinds:
            out.append(
                f"{where}.figures.{fig}.kind: {spec['kind']!r} is not a registered "
                f"figure; allowed: {', '.join(kinds)}"
            )
        if spec["kind"] == "conservation" and metric is None:
            out.append(f"{where}.figures.{fig}.metric: a conservation figure needs a metric")
        if "table" in spec and "metric" in spec:
            out.append(f"{where}.figures.{fig}: give a metric or a table, not both")
        if metric is not None and metric not in metrics:
            out.append(
                f"{where}.figures.{fig}.metric: unknown metric {metric!r}; allowed: "
                + ", ".join(metrics)
            )
        if spec["kind"] not in kinds:
            continue
        drawn = register_figure.entry(spec["kind"]).meta["tables"]  # (): it reads a metric
        if drawn and spec.get("table") not in drawn:
            given = f", not {spec['table']!r}" if "table" in spec else "; give table: one of them"
            out.append(
                f"{where}.figures.{fig}.table: a {spec['kind']} figure draws "
                f"{' or '.join(drawn)}{given}"
            )
        elif not drawn and "table" in spec:
            out.append(
                f"{where}.figures.{fig}.table: a {spec['kind']} figure reads a metric, not a table"
            )
    return out


def dataset_problems(where: str, dataset) -> list[str]:
    """A dataset name (or a ``{name: ...}`` block) that no dataset is registered under."""
    from pipeline.data import register_dataset

    try:
        register_dataset.entry(dataset["name"] if isinstance(dataset, dict) else dataset)
    except KeyError as err:
        return [f"{where}: {err.args[0]}"]
    return []


def model_problems(where: str, model: dict) -> list[str]:
    """Problems of one model block: its name, and options the builder does not take."""
    from pipeline.models import register_model

    try:
        entry = register_model.entry(model.get("name", ""))
    except KeyError as err:
        return [f"{where}.name: {err.args[0]}"]
    return [
        f"{where}.{key}: unknown option for model {entry.name!r}; allowed: "
        + ", ".join(entry.params)
        for key in model
        if key not in ("name", "label") and key not in entry.params
    ]


def _sweep_target(key: str) -> tuple[str, str | None]:
    """``"lr" -> ("train", "lr")``; ``"model.width" -> ("model", "width")``; ``"model"`` (a list
    of whole model blocks) -> ``("model", None)``."""
    if key == "model":
        return "model", None
    if "." in key:
        section, leaf = key.split(".", 1)
        if section == "model":
            return section, leaf
        if section in sections() and leaf in defaults(section):
            return section, leaf
        allowed = ["model.<option>"] + [f"{s}.{k}" for s in sections() for k in defaults(s)]
        raise KeyError(f"unknown sweep key; allowed: {', '.join(allowed)}")
    if key in defaults("train"):
        return "train", key
    raise KeyError(f"unknown sweep key; allowed: {', '.join(defaults('train'))} (or section.key)")


# -- run expansion ------------------------------------------------------------------------------
def format_value(value: Any) -> str:
    """Readable, stable text for a run-name component."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "-".join(format_value(v) for v in value)
    return str(value)


def _coerce(section: str, key: str, value: Any) -> Any:
    if section in sections():
        kind = {f.name: f.type for f in fields(sections()[section])}[key]
        if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if kind.startswith("tuple") and isinstance(value, list):
            return tuple(value)
    return value


@dataclass(frozen=True)
class Run:
    """One training run: its name, full hyperparameters, and the non-default subset."""

    study: str
    name: str  # e.g. "lr~0.1/seed~1"
    seed: int
    hparams: dict  # model, dataset, train, checkpoints (all fields resolved), seed

    @property
    def nondefault(self) -> dict:
        out: dict = {"model": self.hparams["model"], "seed": self.seed}
        for section in self.hparams:
            if section in ("model", "seed"):
                continue
            if section not in SECTIONS:
                out[section] = {}  # a science's section: present, even at its defaults
            base = defaults(section)
            diff = {
                k: v for k, v in self.hparams[section].items() if _jsonable(base[k]) != _jsonable(v)
            }
            if diff:
                out[section] = diff
        return out

    @property
    def fingerprint(self) -> str:
        return run_fingerprint(self.hparams)


def run_fingerprint(hparams: dict) -> str:
    """Hash of every resolved hyperparameter: checkpoints of other settings are never resumed."""
    text = json.dumps(_jsonable(hparams), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _jsonable(value):
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _name_key(sweep_key: str) -> str:
    """The run-name component of a sweep key: ``lr``, ``bn_eps`` (model.bn_eps), ``model``
    (whole model blocks), ``dataset`` (dataset.name)."""
    return "dataset" if sweep_key == "dataset.name" else sweep_key.rsplit(".", 1)[-1]


def _strip_label(model: dict) -> dict:
    return {k: v for k, v in model.items() if k != "label"}


def expand_runs(study_name: str, study: dict) -> list[Run]:
    """The Cartesian product of a study's sweep and seeds, as named runs."""
    base: dict = {"model": _strip_label(study.get("model", {}))}
    for section in sections(study):
        merged = {**defaults(section), **study.get(section, {})}
        base[section] = {k: _coerce(section, k, v) for k, v in merged.items()}
    sweep = study.get("sweep", {})
    targets = [_sweep_target(k) for k in sweep]
    keys = [_name_key(k) for k in sweep]
    runs = []
    for values in itertools.product(*sweep.values()):
        for seed in study.get("seeds", [0]):
            hp = {s: dict(v) for s, v in base.items()}
            parts = []
            for (section, leaf), key, value in zip(targets, keys, values, strict=True):
                if leaf is None:  # a whole model block
                    hp["model"] = _strip_label(value)
                    parts.append(f"model~{value.get('label', value['name'])}")
                    continue
                value = _coerce(section, leaf, value)
                hp[section][leaf] = value
                parts.append(f"{key}~{format_value(value)}")
            parts.append(f"seed~{seed}")
            hp["seed"] = seed
            runs.append(Run(study_name, "/".join(parts), seed, hp))
    return runs


def resolve_hparams(nondefault: dict) -> dict:
    """Full hyperparameters from the non-default subset (:attr:`Run.nondefault`)."""
    out = {"model": dict(nondefault["model"]), "seed": nondefault["seed"]}
    for section in sections({k: v for k, v in nondefault.items() if k not in ("model", "seed")}):
        merged = {**defaults(section), **nondefault.get(section, {})}
        out[section] = {k: _coerce(section, k, v) for k, v in merged.items()}
    return out


def load(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text())
