"""What a study plans for teleportation (torch-free: the workflow reads it while it parses).

- the ``teleport`` part of a train study (a ``teleport`` block, or a sweep over ``teleport.*``):
  its runs teleport while they train, and the Figure 6 grid's validation curves are one table;
- the ``interpolation`` part: the 1D interpolation between the study's first two runs;
- the analysis-only kinds ``teleport_micro``, ``teleport_statistics`` and
  ``teleport_histograms``: one table each, from the study block alone
  (:func:`pipeline.teleport.tables.write_study_table`).
"""

from __future__ import annotations

from typing import ClassVar

from pipeline.config import dataset_problems, model_problems
from pipeline.studies import (
    StudyKind,
    StudyPart,
    register_study_kind,
    register_study_part,
)


class TeleportPart(StudyPart):
    key = "teleport"
    blocks = {"teleport": "pipeline.teleport.hparams:TeleportHparams"}

    @classmethod
    def present(cls, spec: dict) -> bool:
        return "teleport" in spec or any(k.startswith("teleport.") for k in spec.get("sweep", {}))

    def rules(self) -> set[str]:
        return {"teleport_validation"}

    def tables(self) -> list[str]:
        return ["tables/validation"]


class InterpolationPart(StudyPart):
    key = "interpolation"

    def rules(self) -> set[str]:
        return {"interpolation"}

    def tables(self) -> list[str]:
        return ["tables/interpolation"]

    def problems(self) -> list[str]:
        if len(self.study.runs()) < 2:
            return [
                f"studies.{self.study.name}.interpolation: needs two runs (e.g. a sweep over "
                "batch_size)"
            ]
        return []


class AnalysisStudy(StudyKind):
    """A teleportation analysis: trains nothing, writes one table from its block alone
    (subclasses set ``schema``, ``keys`` and ``table_name``)."""

    table_name: ClassVar[str]

    def rules(self) -> set[str]:
        return {"teleport_analysis"}

    def tables(self) -> list[str]:
        return [f"tables/{self.table_name}"]

    def problems(self, studies: dict) -> list[str]:
        where = f"studies.{self.name}"
        out = []
        if "model" in self.spec:
            out += model_problems(f"{where}.model", self.spec["model"])
        for i, block in enumerate(self.spec.get("models", [])):
            out += model_problems(f"{where}.models[{i}]", block)
        return out + dataset_problems(f"{where}.dataset", self.spec.get("dataset", "digits"))


class MicroStudy(AnalysisStudy):
    schema = "teleport_micro_study"
    keys = (
        "dataset",
        "models",
        "batch_sizes",
        "iterations",
        "cob_range",
        "sampling",
        "inputs",
        "seed",
    )
    table_name = "micro"


class StatisticsStudy(AnalysisStudy):
    schema = "teleport_statistics_study"
    keys = (
        "dataset",
        "models",
        "batch_size",
        "batches",
        "teleports",
        "cob_ranges",
        "sampling",
        "seed",
    )
    table_name = "statistics"


class HistogramsStudy(AnalysisStudy):
    schema = "teleport_histograms_study"
    keys = ("dataset", "model", "cob_range", "sampling", "bins", "seed")
    table_name = "histograms"


@register_study_part("teleport")
def teleport_part() -> type[StudyPart]:
    return TeleportPart


@register_study_part("interpolation")
def interpolation_part() -> type[StudyPart]:
    return InterpolationPart


@register_study_kind("teleport_micro")
def micro_kind() -> type[StudyKind]:
    return MicroStudy


@register_study_kind("teleport_statistics")
def statistics_kind() -> type[StudyKind]:
    return StatisticsStudy


@register_study_kind("teleport_histograms")
def histograms_kind() -> type[StudyKind]:
    return HistogramsStudy
