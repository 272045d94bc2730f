"""Study kinds: what a study's config block holds and what the workflow builds for it.

Each kind of study is a class, :class:`StudyKind`, registered by a torch-free factory::

    @register_study_kind("modelsym")
    def modelsym_kind() -> type[StudyKind]:
        return ModelsymStudy

An instance, one per study, plans the study: its training runs (:meth:`StudyKind.runs`), the rule
families it takes part in (:meth:`StudyKind.rules`: the Snakefile's wildcard constraints), the
tables ``all`` builds (:meth:`StudyKind.tables`), where its named tables live (a figure's
``table:``), the tables its claims may read, the jobs that record their code, and its config
problems beyond the schema (:meth:`StudyKind.problems`, checked before any job runs). Its class
names the schema definition of its block and the hyperparameter dataclass of each typed block in
it (``tests/test_schema.py`` checks the schema against them).

The ``train`` kind (:class:`TrainStudy`) is the core's. A science extends it with a *part*, a
block of a train study (``masks``, ``teleport``, ``prune``...): :class:`StudyPart`, registered the
same way with ``@register_study_part(key)``. The core never imports a science: it finds kinds
and parts through the registries, which read the sources (:mod:`pipeline.registry`).

Imports nothing heavy: Snakemake builds the :class:`Plan` while it parses the workflow.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

from pipeline.config import (
    ConfigError,
    Run,
    defaults,
    expand_runs,
    figure_problems,
    schema_problems,
    selection_note,
    selection_problems,
    train_problems,
)
from pipeline.registry import Registry

#: ``@register_study_kind(kind)`` on a torch-free function returning a :class:`StudyKind` class
register_study_kind = Registry("study kind", "register_study_kind")
#: ``@register_study_part(key)`` on a torch-free function returning a :class:`StudyPart` class
register_study_part = Registry("study part", "register_study_part")


class StudyKind:
    """One study of a kind: its block, read once, and everything planned from it.

    Class attributes: ``schema``, the ``$defs`` entry of config/schema/config.schema.yaml that
    validates the block; ``keys``, the keys the block may hold besides :data:`COMMON_KEYS`;
    ``blocks``, ``$defs`` name -> ``"module:Class"`` of the hyperparameter dataclass that reads
    each typed block (strings: the classes may live in modules that import torch).
    """

    COMMON_KEYS: ClassVar[tuple[str, ...]] = ("kind", "description", "figures", "resources")
    schema: ClassVar[str]
    keys: ClassVar[tuple[str, ...]] = ()
    blocks: ClassVar[dict[str, str]] = {}

    def __init__(self, name: str, spec: dict):
        self.name = name
        self.spec = spec

    def runs(self) -> list[Run]:
        """The ordinary training runs (one ``train`` job each, or ``runs_per_job`` per job),
        planned once per study (:meth:`plan_runs`)."""
        return self._planned_runs

    @cached_property
    def _planned_runs(self) -> list[Run]:
        return self.plan_runs()

    def plan_runs(self) -> list[Run]:
        """The runs the block asks for (a kind that trains overrides it; default: none)."""
        return []

    def rules(self) -> set[str]:
        """The rule families that apply to this study (their ``study`` wildcard constraint)."""
        return {"train"} if self.runs() else set()

    def tables(self) -> list[str]:
        """The tables ``all`` builds: paths under ``results/<study>/`` without ``.parquet``."""
        return []

    def planner(self, rule: str):
        """What plans the inputs of the rules of family ``rule`` (this kind, or its part)."""
        return self

    def table(self, name: str) -> str:
        """Where the science table ``name`` a figure reads (``table: name``) lives."""
        return f"tables/{name}"

    def claim_tables(self) -> list[str]:
        """The tables the study's claims may read (same form as :meth:`tables`)."""
        return self.tables()

    def figure_tables(self) -> list[str]:
        """The tables a figure's ``table:`` may name (same form as :meth:`tables`)."""
        return list(dict.fromkeys(self.tables() + self.claim_tables()))

    def recorded_jobs(self) -> list[tuple[str, str, dict]]:
        """Jobs beyond the runs that record the code that made them (:mod:`pipeline.stale`):
        ``(summary.json path, code target, config)``."""
        return []

    def problems(self, studies: dict) -> list[str]:
        """Config problems the schema cannot see (``studies``: every study block, for
        references between studies), each naming its key."""
        return []

    @property
    def traced(self) -> bool:
        """Its runs log the per-step mechanics trace (``train.mechanics``)."""
        return False


class StudyPart:
    """A block of a train study that a science adds (class attribute ``key``: the block's key;
    ``blocks`` as for :class:`StudyKind`). Present when the study has the block."""

    key: ClassVar[str]
    blocks: ClassVar[dict[str, str]] = {}

    def __init__(self, study: TrainStudy):
        self.study = study
        self.spec = study.spec.get(self.key, {})

    @classmethod
    def present(cls, spec: dict) -> bool:
        return cls.key in spec

    def rules(self) -> set[str]:
        return set()

    def tables(self) -> list[str]:
        return []

    def table(self, name: str) -> str | None:
        """Where the part's table ``name`` lives, or None if it is not the part's."""
        return None

    def claim_tables(self) -> list[str]:
        return self.tables()

    def problems(self) -> list[str]:
        return []


def _parts() -> list[type[StudyPart]]:
    return [register_study_part.get(key)() for key in register_study_part.names()]


class TrainStudy(StudyKind):
    """``kind: train``: a sweep of runs (times seeds), the metrics cached from each, and the
    parts a science adds (weight masks, teleportation, pruning...)."""

    schema = "train_study"
    keys = (
        "test_selection",
        "model",
        "dataset",
        "train",
        "checkpoints",
        "sweep",
        "seeds",
        "runs_per_job",
        "rerun_on_code_change",
        "metrics",
    )  # and the key of each registered part
    blocks = {
        "train": "pipeline.config:TrainHparams",
        "checkpoints": "pipeline.config:CheckpointHparams",
        "dataset": "pipeline.config:DatasetHparams",
    }

    @cached_property
    def parts(self) -> list[StudyPart]:
        return [part(self) for part in _parts() if part.present(self.spec)]

    def plan_runs(self) -> list[Run]:
        return expand_runs(self.name, self.spec)

    @property
    def traced(self) -> bool:
        return bool(self.spec.get("train", {}).get("mechanics", defaults("train")["mechanics"]))

    @property
    def chunked(self) -> bool:
        """Its runs train ``runs_per_job`` to a job (see :meth:`chunks`)."""
        return self.spec.get("runs_per_job", 1) > 1

    def chunks(self) -> list[tuple[int, list[Run]]]:
        """``(index, runs)`` of each job of a chunked study."""
        size, runs = self.spec.get("runs_per_job", 1), self.runs()
        return [(i // size, runs[i : i + size]) for i in range(0, len(runs), size)]

    def planner(self, rule: str):
        for part in self.parts:
            if rule in part.rules():
                return part
        return self

    def rules(self) -> set[str]:
        out = {"chunked" if self.chunked else "train_traced" if self.traced else "train"}
        for part in self.parts:
            out |= part.rules()
        return out

    def tables(self) -> list[str]:
        out = [f"cache/{metric}" for metric in self.spec.get("metrics", [])]
        for part in self.parts:
            out += part.tables()
        return out

    def table(self, name: str) -> str:
        for part in self.parts:
            found = part.table(name)
            if found is not None:
                return found
        return super().table(name)

    def claim_tables(self) -> list[str]:
        out = self.tables() + [f"cache/{m}.summary" for m in self.spec.get("metrics", [])]
        for part in self.parts:
            out += part.claim_tables()
        return list(dict.fromkeys(out))

    def problems(self, studies: dict) -> list[str]:
        where = f"studies.{self.name}"
        out = train_problems(self.name, self.spec)
        out += selection_problems(where, [(f"{where}.train", self.spec)], self.spec)
        for part in self.parts:
            out += part.problems()
        return out


def table_problems(kind: StudyKind) -> list[str]:
    """Each figure's ``table:`` must name a table the study builds (:meth:`StudyKind.table`
    of the name among :meth:`StudyKind.figure_tables`)."""
    known = kind.figure_tables()
    names = sorted({t.rsplit("/", 1)[-1] for t in known if not t.startswith("cache/")})
    names = [n for n in names if kind.table(n) in known]
    out = []
    for fig, spec in kind.spec.get("figures", {}).items():
        if "table" in spec and kind.table(spec["table"]) not in known:
            out.append(
                f"studies.{kind.name}.figures.{fig}.table: {spec['table']!r} is not a table of "
                f"this {kind.spec['kind']} study; tables: {', '.join(names) or '(none)'}"
            )
    return out


def kind_class(kind: str) -> type[StudyKind]:
    """The class of study kind ``kind`` (``train`` or a registered one)."""
    if kind == "train":
        return TrainStudy
    return register_study_kind.get(kind)()


def kind_names() -> list[str]:
    return sorted(["train", *register_study_kind.names()])


def validate(config: dict) -> None:
    """Check a config against the schema, then every study against its kind (and the figures
    against the registries); raise :class:`ConfigError` naming every offending key."""
    problems = schema_problems(config)
    if problems:
        raise ConfigError(problems)
    studies = config.get("studies", {})
    figures: dict[str, str] = {}
    for name, spec in studies.items():
        if spec["kind"] not in kind_names():  # in the schema, not registered
            allowed = ", ".join(kind_names())
            where = f"studies.{name}.kind"
            problems.append(f"{where}: no study kind {spec['kind']!r}; allowed: {allowed}")
            continue
        kind = kind_class(spec["kind"])(name, spec)
        problems += kind.problems(studies) + table_problems(kind)
        problems += figure_problems(f"studies.{name}", spec)
        for fig in spec.get("figures", {}):
            if fig in figures:
                problems.append(
                    f"studies.{name}.figures.{fig}: figure name already used by study "
                    f"{figures[fig]!r}; figure names are global"
                )
            figures[fig] = name
    if problems:
        raise ConfigError(problems)


@dataclass
class Plan:
    """A validated config, planned: one :class:`StudyKind` per study, and their runs."""

    config: dict
    kinds: dict[str, StudyKind] = field(default_factory=dict)
    runs: dict[str, list[Run]] = field(default_factory=dict)

    @classmethod
    def from_config(cls, config: dict, check: bool = True) -> Plan:
        if check:
            validate(config)
        plan = cls(config)
        for name, spec in config.get("studies", {}).items():
            plan.kinds[name] = kind_class(spec["kind"])(name, spec)
            plan.runs[name] = plan.kinds[name].runs()
        return plan

    def study(self, name: str) -> dict:
        return self.config["studies"][name]

    def kind(self, name: str) -> StudyKind:
        return self.kinds[name]

    def planner(self, study: str, rule: str):
        """What plans the inputs of ``study``'s rules of family ``rule``
        (:meth:`StudyKind.planner`)."""
        return self.kinds[study].planner(rule)

    def having(self, rule: str) -> list[str]:
        """The studies that rule family ``rule`` applies to (see :meth:`StudyKind.rules`)."""
        return [name for name, kind in self.kinds.items() if rule in kind.rules()]

    def run(self, study: str, run: str) -> Run:
        if not hasattr(self, "_index"):
            self._index = {(r.study, r.name): r for runs in self.runs.values() for r in runs}
        try:
            return self._index[(study, run)]
        except KeyError:
            raise KeyError(f"study {study!r} has no run {run!r}") from None

    def tables(self, study: str) -> list[str]:
        """The files of the tables ``all`` builds for ``study``."""
        return [f"results/{study}/{t}.parquet" for t in self.kinds[study].tables()]

    def table(self, study: str, name: str) -> str:
        """The file of the named science table of ``study`` (a figure's ``table:``)."""
        return f"results/{study}/{self.kinds[study].table(name)}.parquet"

    def claim_tables(self, study: str) -> dict[str, str]:
        """``key -> file`` of every table the study's claims may read (key: the path under
        ``results/<study>/`` without ``.parquet``)."""
        return {t: f"results/{study}/{t}.parquet" for t in self.kinds[study].claim_tables()}

    def figures(self) -> dict[str, tuple[str, dict]]:
        """``figure name -> (study, figure spec)`` over all studies. The caption of a figure of
        a study that selects on the test split (``test_selection``) says so first."""
        out = {}
        for name, study in self.config.get("studies", {}).items():
            note = selection_note(study)
            for fig, spec in study.get("figures", {}).items():
                if note:
                    spec = {**spec, "caption": note + spec.get("caption", fig)}
                out[fig] = (name, spec)
        return out

    def targets(self) -> list[str]:
        """What ``all`` builds: every figure, every study's tables, and the claims."""
        tables = [t for study in self.kinds for t in self.tables(study)]
        return (
            [f"results/{fig}.pdf" for fig in self.figures()] + tables + ["results/claims.parquet"]
        )
