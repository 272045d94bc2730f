"""The problems of a ``recovery`` study, read from its config block (torch-free: the workflow
calls this while it parses).

A study block::

    problems:                     # named problems, each a teacher and a probe (+ overrides)
      toy_tanh: {teacher: {kind: toy, ...}, probe: {inputs: gaussian, n: 500}}
      digits: {teacher: {kind: run, study: digits_teacher, run: "seed~1"}, probe: {inputs: digits}}
    family: {count: 12, seed: 0, probe: {...}, ...}   # generated toy problems (toy_family)
    expand: {...}                 # ExpandHparams, shared; a problem's own `expand` overrides
    cluster: {...}                # ClusterHparams, likewise
    lottery: {strategies: [sparse_global, fc19, han], fraction: 0.2, levels: 4}
"""

from __future__ import annotations

import random
from functools import cached_property

from pipeline import seeding
from pipeline.config import expand_runs
from pipeline.studies import StudyKind, register_study_kind


def toy_family(
    count: int,
    seed: int = 0,
    activations=("relu", "tanh", "sigmoid"),
    input_dims=(2, 10),
    widths=(3, 8),
    gains=None,
    min_angles=None,
    **teacher,
) -> dict[str, dict]:
    """``count`` toy teacher configs: input dims and hidden widths drawn uniformly from the
    inclusive ranges, activations in turn, teacher seeds derived from ``seed``; named
    ``{activation}-d{dim}-w{width}-{i}``. ``widths``: a range for one hidden layer, or a list
    of ranges, one per hidden layer. ``gains``: a weight gain per activation (default 1;
    ``sigmoid(z) = (1 + tanh(z / 2)) / 2``, so a sigmoid teacher of gain 2 spans the
    nonlinearity as a tanh teacher of gain 1); ``min_angles``: a range the teacher's minimum
    angle between neurons is drawn from (degrees; each name then ends in ``-a{angle}``);
    ``teacher``: further ToyTeacher fields for all."""
    gains = gains or {}
    ranges = [widths] if isinstance(widths[0], int) else list(widths)
    rng = random.Random(seeding.derive(seed, "toy-family"))
    out = {}
    for i in range(count):
        act = activations[i % len(activations)]
        dim = rng.randint(input_dims[0], input_dims[1])
        drawn = [rng.randint(low, high) for low, high in ranges]
        spec = {"min_angle": round(rng.uniform(*min_angles), 1)} if min_angles else {}
        name = f"{act}-d{dim}-w{'-'.join(map(str, drawn))}-{i}"
        if spec:
            name += f"-a{spec['min_angle']:g}"
        out[name] = {
            "kind": "toy",
            "input_dim": dim,
            "widths": drawn,
            "activation": act,
            "seed": seeding.derive(seed, "toy-teacher", i) % 2**31,
            "gain": gains.get(act, 1.0),
            **teacher,
            **spec,
        }
    return out


def _merge(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        out[key] = (
            _merge(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def problems(study: dict) -> dict[str, dict]:
    """``name -> {teacher, probe, expand, cluster}`` with the study-level settings merged in."""
    out: dict[str, dict] = {}
    for name, spec in study.get("problems", {}).items():
        out[name] = {
            "teacher": spec["teacher"],
            "probe": spec.get("probe", {}),
            "expand": _merge(study.get("expand", {}), spec.get("expand", {})),
            "cluster": _merge(study.get("cluster", {}), spec.get("cluster", {})),
        }
    if "family" in study:
        family = dict(study["family"])
        probe = family.pop("probe", {"inputs": "gaussian"})
        for name, teacher in toy_family(**family).items():
            out[name] = {
                "teacher": teacher,
                "probe": probe,
                "expand": study.get("expand", {}),
                "cluster": study.get("cluster", {}),
            }
    return out


#: a teacher neuron counts as recovered within this 1 - |cos| (the study's ``tolerance``)
TOLERANCE = 1e-3
#: the per-problem tables collected into one study table each
TABLES = ("recovery", "neurons", "students_history", "finetune_history")


class RecoveryStudy(StudyKind):
    """``kind: recovery``: per problem, the students (``students/``), their clustering into the
    recovered network (``cluster/``), and with a ``lottery`` block the students' lottery
    tickets; the tables collected over the problems."""

    schema = "recovery_study"
    keys = ("problems", "family", "expand", "cluster", "tolerance", "lottery")
    blocks = {
        "recovery_expand": "pipeline.recovery.students:ExpandHparams",
        "recovery_fit": "pipeline.recovery.students:FitHparams",
        "recovery_cluster": "pipeline.recovery.cluster:ClusterHparams",
        "lottery": "pipeline.train.pruning:LotteryHparams",
        "recovery_toy_teacher": "pipeline.recovery.teachers:ToyTeacher",
    }

    @cached_property
    def problems_planned(self) -> dict[str, dict]:
        """``name -> {teacher, probe, expand, cluster}`` (:func:`problems`)."""
        return problems(self.spec)

    @property
    def tolerance(self) -> float:
        return self.spec.get("tolerance", TOLERANCE)

    def rules(self) -> set[str]:
        return {"recovery", "lottery"} if "lottery" in self.spec else {"recovery"}

    def tables(self) -> list[str]:
        out = ["tables/recovery"]
        return out + ["tables/lottery"] if "lottery" in self.spec else out

    def figure_tables(self) -> list[str]:
        return list(dict.fromkeys(super().figure_tables() + [f"tables/{t}" for t in TABLES]))

    def collect_inputs(self, table: str) -> list[str]:
        """The per-problem files of the study table ``table`` (one of :data:`TABLES`)."""
        stage = "students" if table == "students_history" else "cluster"
        return [
            f"results/{self.name}/recovery/{p}/{stage}/{table}.parquet"
            for p in self.problems_planned
        ]

    def lottery_block(self) -> dict:
        """The lottery settings of every problem's students (``LotteryHparams`` keys)."""
        return self.spec["lottery"]

    def lottery_strategies(self) -> list[str]:
        return self.lottery_block().get("strategies", ["sparse_global"])

    def lottery_inputs(self) -> list[tuple[str, dict]]:
        """``(level table, the columns saying whose it is)`` of every problem and strategy."""
        return [
            (f"results/{self.name}/recovery/{p}/lottery/{s}/lottery.parquet", {"problem": p})
            for p in self.problems_planned
            for s in self.lottery_strategies()
        ]

    def problems(self, studies: dict) -> list[str]:
        """Each problem's teacher (a toy teacher's activation is a known one; a trained run is a
        run of a train study) and probe (:func:`probe_problems`), and the family's."""
        where = f"studies.{self.name}"
        out = []
        for problem, spec in self.spec.get("problems", {}).items():
            out += teacher_problems(f"{where}.problems.{problem}.teacher", spec["teacher"], studies)
            out += probe_problems(f"{where}.problems.{problem}.probe", spec.get("probe", {}))
        family = self.spec.get("family", {})
        for i, act in enumerate(family.get("activations", ())):
            out += activation_problems(f"{where}.family.activations[{i}]", act)
        out += probe_problems(f"{where}.family.probe", family.get("probe", {}))
        return out


#: probe keys that only a distribution, or only a dataset, reads
DISTRIBUTION_KEYS, DATASET_KEYS = ("n", "n_test", "scale"), ("noise", "subset", "mask_inputs")


def probe_problems(where: str, probe: dict) -> list[str]:
    """A probe's inputs must be a distribution (gaussian, uniform) or a registered dataset, and
    it may hold only the keys its kind of inputs reads."""
    from pipeline.data import register_dataset

    inputs = probe.get("inputs", "gaussian")
    if inputs in ("gaussian", "uniform"):
        foreign, kind = DATASET_KEYS, "a distribution"
    elif inputs in register_dataset.names():
        foreign, kind = DISTRIBUTION_KEYS, "a dataset"
    else:
        allowed = ", ".join(["gaussian", "uniform", *register_dataset.names()])
        what = "is not a distribution or a dataset"
        return [f"{where}.inputs: {inputs!r} {what}; allowed: {allowed}"]
    return [
        f"{where}.{key}: {kind} probe (inputs: {inputs}) does not read it"
        for key in foreign
        if key in probe
    ]


def activation_problems(where: str, name: str) -> list[str]:
    from pipeline.models.activations import TABLE

    if name in TABLE:
        return []
    return [f"{where}: unknown activation {name!r}; allowed: {', '.join(sorted(TABLE))}"]


def teacher_problems(where: str, teacher: dict, studies: dict) -> list[str]:
    """A toy teacher's activation must be known; a trained run's teacher must name a run of a
    train study of the config."""
    if teacher.get("kind") != "run":
        return activation_problems(f"{where}.activation", teacher.get("activation", "relu"))
    other = studies.get(teacher.get("study"))
    if other is None or other["kind"] != "train":
        trains = [s for s, v in studies.items() if v["kind"] == "train"]
        return [
            f"{where}.study: {teacher.get('study')!r} is not a train study; "
            f"allowed: {', '.join(trains)}"
        ]
    runs = [r.name for r in expand_runs(teacher["study"], other)]
    if teacher.get("run") not in runs:
        return [
            f"{where}.run: {teacher.get('run')!r} is not a run of study "
            f"{teacher['study']!r}; runs: {', '.join(runs)}"
        ]
    return []


@register_study_kind("recovery")
def recovery_kind() -> type[StudyKind]:
    return RecoveryStudy
