"""What the weight-mask blocks plan for a train study (torch-free: read while the workflow
parses): ``masks``, every stage's mask on each run's final network and the modularity tables
(``masks/tables/<table>.parquet``, :data:`pipeline.masks.study.TABLES`); ``transfer``, the
permuted-input transfer (``transfer/accuracy.parquet``)."""

from __future__ import annotations

from pipeline.registry import source_constant
from pipeline.studies import StudyPart, register_study_part

#: the study tables of the masks stage (read from the source: that module imports torch)
TABLES = source_constant("pipeline.masks.study", "TABLES")


class MasksPart(StudyPart):
    key = "masks"
    blocks = {"mask_hparams": "pipeline.masks.train:MaskHparams"}

    def rules(self) -> set[str]:
        return {"masks"}

    def tables(self) -> list[str]:
        return ["masks/tables/accuracy"]

    def table(self, name: str) -> str | None:
        return f"masks/tables/{name}" if name in TABLES else None

    def claim_tables(self) -> list[str]:
        return [f"masks/tables/{t}" for t in TABLES]

    def problems(self) -> list[str]:
        """Every stage a comparison names must be a stage of the block."""
        spec = self.spec
        stages = set(spec.get("stages", {}))
        named = [spec["reference"]] if spec.get("reference") else []
        named += spec.get("inverse", {}).get("masks", []) + spec.get("sharing", [])
        named += [n for pair in spec.get("overlap", []) for n in pair]
        return [
            f"studies.{self.study.name}.masks: {stage!r} is not a stage; stages: "
            + ", ".join(sorted(stages))
            for stage in sorted(set(named) - stages)
        ]


class TransferPart(StudyPart):
    key = "transfer"
    blocks = {"mask_hparams": "pipeline.masks.train:MaskHparams"}

    def rules(self) -> set[str]:
        return {"transfer"}

    def tables(self) -> list[str]:
        return ["transfer/accuracy"]


@register_study_part("masks")
def masks_part() -> type[StudyPart]:
    return MasksPart


@register_study_part("transfer")
def transfer_part() -> type[StudyPart]:
    return TransferPart
