"""What a ``prune`` block plans for a train study (torch-free: read while the workflow
parses): lottery levels (prune, rewind, retrain) of every run's final network for each
strategy, collected into ``tables/lottery.parquet``."""

from __future__ import annotations

from pipeline.studies import StudyPart, register_study_part


class PrunePart(StudyPart):
    key = "prune"
    blocks = {"lottery": "pipeline.train.pruning:LotteryHparams"}

    def rules(self) -> set[str]:
        return {"prune", "lottery"}

    def tables(self) -> list[str]:
        return ["tables/lottery"]

    def lottery_block(self) -> dict:
        """The lottery settings of every run (``LotteryHparams`` keys)."""
        return self.spec

    def lottery_strategies(self) -> list[str]:
        return self.spec.get("strategies", ["sparse_global"])

    def lottery_inputs(self) -> list[tuple[str, dict]]:
        """``(level table, the columns saying whose it is)`` of every run and strategy."""
        return [
            (
                f"results/{self.study.name}/prune/{r.name}/{s}/lottery.parquet",
                {"run": r.name, "seed": r.seed},
            )
            for r in self.study.runs()
            for s in self.lottery_strategies()
        ]


@register_study_part("prune")
def prune_part() -> type[StudyPart]:
    return PrunePart
