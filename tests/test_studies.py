"""The study kinds plan what the rules build: every rule family a rule file names is one some kind
takes part in, each study's tables are outputs of the rules that apply to it, and a lottery is
planned by whatever owns it (a recovery study, or a train study's ``prune`` part)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load
from pipeline.pruning.plan import PrunePart
from pipeline.recovery.plan import RecoveryStudy
from pipeline.studies import Plan, StudyKind, TrainStudy, kind_class, kind_names, validate

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(p for p in (ROOT / "config").rglob("*.yaml") if "schema" not in p.parts)
#: the rule families the rule files name: ``study=studies("<family>")``
FAMILIES = sorted(
    {
        m
        for path in (ROOT / "rules").glob("*.smk")
        for m in re.findall(r'studies\("([a-z_]+)"\)', path.read_text())
    }
    | {
        m
        for path in (ROOT / "rules").glob("*.smk")
        for m in re.findall(r'PLAN\.having\("([a-z_]+)"\)', path.read_text())
    }
)


@pytest.fixture(scope="module")
def plans() -> dict[str, Plan]:
    return {p.relative_to(ROOT).as_posix(): Plan.from_config(load(p)) for p in CONFIGS}


def test_every_rule_family_the_rules_name_is_planned_by_some_study(plans):
    """A family no kind plans would leave its rules matching no study (a typo in
    ``studies("...")`` would silently build nothing)."""
    assert len(FAMILIES) >= 10, FAMILIES
    planned = {
        rule for plan in plans.values() for kind in plan.kinds.values() for rule in kind.rules()
    }
    assert set(FAMILIES) <= planned, sorted(set(FAMILIES) - planned)
    assert planned <= set(FAMILIES) | {"chunked"}, sorted(planned - set(FAMILIES))


def test_the_snakefile_includes_every_rule_file():
    """A rule file the Snakefile does not include builds nothing (its studies' tables are then
    missing inputs of ``all``), though its families count as planned above."""
    text = (ROOT / "Snakefile").read_text()
    included = set(re.findall(r'^include:\s*"(rules/[^"]+\.smk)"', text, re.M))
    files = {p.relative_to(ROOT).as_posix() for p in (ROOT / "rules").glob("*.smk")}
    assert files <= included, f"add to the Snakefile: include: {sorted(files - included)}"


def test_every_kind_is_a_class_the_plan_instantiates(plans):
    assert {"train", "modelsym", "recovery"} <= set(kind_names())
    for plan in plans.values():
        for name, kind in plan.kinds.items():
            assert isinstance(kind, StudyKind)
            assert type(kind) is kind_class(plan.study(name)["kind"])
            assert plan.runs[name] == kind.runs()


def test_the_default_plans_each_science_table_where_its_rule_writes_it(plans):
    """The default's tables follow the output patterns of the rules that write them."""
    plan = plans["config/config.yaml"]
    patterns = {
        "train": [r"cache/[a-z_]+"],
        "masks": [r"masks/tables/accuracy"],
        "transfer": [r"transfer/accuracy"],
        "teleport_validation": [r"tables/validation"],
        "interpolation": [r"tables/interpolation"],
        "teleport_analysis": [r"tables/(micro|statistics|histograms)"],
        "modelsym": [r"tables/(alignment|stitching|rotation)"],
        "recovery": [r"tables/recovery"],
        "lottery": [r"tables/lottery"],
    }
    for name, kind in plan.kinds.items():
        allowed = [p for rule in kind.rules() for p in patterns.get(rule, [])]
        allowed.append(r"cache/[a-z_]+")  # a metric cache of any train-like study
        for table in kind.tables():
            assert any(re.fullmatch(p, table) for p in allowed), (name, table, kind.rules())
    assert len(plan.targets()) == len(set(plan.targets()))


def test_a_lottery_is_planned_by_its_owner(plans):
    """A train study's lottery is its ``prune`` part's (a level table per run and strategy); a
    recovery study's is its own (per problem and strategy)."""
    seen = set()
    for plan in plans.values():
        for name in plan.having("lottery"):
            planner, kind = plan.planner(name, "lottery"), plan.kind(name)
            strategies = planner.lottery_strategies()
            inputs = planner.lottery_inputs()
            if isinstance(kind, TrainStudy):
                assert isinstance(planner, PrunePart) and planner.spec is plan.study(name)["prune"]
                owners = [{"run": r.name, "seed": r.seed} for r in plan.runs[name]]
            else:
                assert isinstance(planner, RecoveryStudy) and planner is kind
                owners = [{"problem": p} for p in kind.problems_planned]
            assert [labels for _, labels in inputs] == [o for o in owners for _ in strategies]
            assert len({path for path, _ in inputs}) == len(inputs)
            seen.add(type(planner))
    assert seen == {PrunePart, RecoveryStudy}


def _reads_a_table(path: Path) -> bool:
    studies = load(path).get("studies", {}).values()
    return any("table" in f for spec in studies for f in spec.get("figures", {}).values())


@pytest.mark.parametrize(
    "config", [p.relative_to(ROOT).as_posix() for p in CONFIGS if _reads_a_table(p)]
)
def test_a_figure_naming_a_table_its_study_lacks_is_refused_by_key(config):
    """A misspelt ``table:`` stops the plan naming each such figure's key (instead of a missing
    input from Snakemake), before any job."""
    cfg = load(ROOT / config)
    validate(cfg)
    keys = {}
    for study, spec in cfg["studies"].items():
        for fig, fspec in spec.get("figures", {}).items():
            if "table" in fspec:
                fspec["table"] += "s"
                keys[f"studies.{study}.figures.{fig}.table"] = fspec["table"]
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for key, wrong in keys.items():
        # not a table of its study, and not one its figure kind draws
        mine = " | ".join(p for p in err.value.problems if p.startswith(f"{key}: "))
        assert f"{key}: {wrong!r} is not a table" in mine, key
        assert "figure draws" in mine, key
    assert len(err.value.problems) == 2 * len(keys)


def _refused_naming(cfg: dict, keys: list[str]) -> None:
    """``validate(cfg)`` raises one problem per key, each naming it."""
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    for key in keys:
        assert key in str(err.value), key
    assert len(err.value.problems) == len(keys)


def _has_modelsym(path: Path) -> bool:
    return any(s["kind"] == "modelsym" for s in load(path).get("studies", {}).values())


@pytest.mark.parametrize(
    "config", [p.relative_to(ROOT).as_posix() for p in CONFIGS if _has_modelsym(p)]
)
def test_a_misspelt_similarity_or_stitching_layer_is_refused_by_key(config):
    """Alignment measures and stitching types are registry names with their functions'
    keywords as options: a misspelt name or option stops the plan naming its key."""

    cfg = load(ROOT / config)
    keys = []
    for study, spec in cfg["studies"].items():
        if spec["kind"] != "modelsym":
            continue
        where = f"studies.{study}"
        metrics = spec["alignment"]["metrics"]
        for i, name in enumerate(list(metrics)):
            if i % 2:
                metrics[name + "z"] = metrics.pop(name)
                keys.append(f"{where}.alignment.metrics.{name}z: unknown similarity")
            else:
                metrics[name] = {**metrics[name], "nosuch": 1}
                keys.append(f"{where}.alignment.metrics.{name}.nosuch: unknown option")
        for i, (label, typ) in enumerate(spec.get("stitching", {}).get("types", {}).items()):
            if i % 2:
                typ["type"] += "z"
                keys.append(f"{where}.stitching.types.{label}.type: unknown stitching layer")
            else:
                typ.setdefault("grid", {})["nosuch"] = [1]
                keys.append(f"{where}.stitching.types.{label}.grid.nosuch: unknown option")
    _refused_naming(cfg, keys)


@pytest.mark.parametrize(
    "config", [p.relative_to(ROOT).as_posix() for p in CONFIGS if _has_modelsym(p)]
)
def test_a_part_naming_a_zoo_the_study_lacks_is_refused_by_key(config):
    """Alignment, stitching and the rotation control each run on the zoos they name: a name
    that is not one of the study's zoos stops the plan naming the part's key (it was a KeyError
    inside an input function)."""
    cfg = load(ROOT / config)
    keys = []
    for study, spec in cfg["studies"].items():
        if spec["kind"] != "modelsym":
            continue
        for part in ("alignment", "stitching", "rotation"):
            if part in spec:
                zoos = spec[part].get("zoos") or list(spec["zoos"])
                spec[part]["zoos"] = [*zoos[1:], zoos[0] + "x"]
                keys.append(f"studies.{study}.{part}.zoos: unknown zoo '{zoos[0]}x'")
    _refused_naming(cfg, keys)


RECOVERY_MISUSE = {
    # mutation of the default's recovery study -> the key the error must name
    "teacher key": (
        lambda st: st["problems"]["toy_tanh"]["teacher"].update(widht=3),
        "teacher.widht",
    ),
    "teacher activation": (
        lambda st: st["problems"]["toy_tanh"]["teacher"].update(activation="tanhh"),
        "teacher.activation",
    ),
    "run teacher key": (
        lambda st: st["problems"]["digits"]["teacher"].update(extra=1),
        "digits.teacher.extra",
    ),
    "probe key": (lambda st: st["problems"]["toy_tanh"]["probe"].update(nn=5), "probe.nn"),
    "probe inputs": (
        lambda st: st["problems"]["toy_tanh"]["probe"].update(inputs="gausian"),
        "probe.inputs",
    ),
    "dataset key on a distribution probe": (
        lambda st: st["problems"]["toy_tanh"]["probe"].update(noise=0.1),
        "probe.noise",
    ),
    "family key": (lambda st: st.update(family={"count": 2, "cnt": 3}), "family.cnt"),
    "family activation": (
        lambda st: st.update(family={"count": 2, "activations": ["relu", "sigmod"]}),
        "family.activations[1]",
    ),
    "distribution key on a dataset probe": (
        lambda st: st.update(family={"count": 2, "probe": {"inputs": "digits", "n": 4}}),
        "family.probe.n",
    ),
}


@pytest.mark.parametrize("case", sorted(RECOVERY_MISUSE))
def test_a_misspelt_recovery_teacher_probe_or_family_is_refused_by_key(case):
    """The recovery blocks that used to be free objects (teacher, probe, family) are typed:
    a misspelt key or value fails before any job, naming the key."""
    config = load(ROOT / "config" / "config.yaml")
    mutate, key = RECOVERY_MISUSE[case]
    mutate(config["studies"]["recovery"])
    with pytest.raises(ConfigError, match=re.escape("studies.recovery.") + ".*" + re.escape(key)):
        validate(config)


def test_a_kind_the_schema_allows_but_nobody_registers_is_a_config_error(monkeypatch):
    """A kind added to the schema whose class is not registered (a forgotten decorator) stops
    the workflow naming the study's key, not with a registry traceback."""
    import pipeline.config as cfg

    schema = cfg.load_schema()
    study = schema["$defs"]["study"]
    study["properties"]["kind"]["enum"].append("weight_norms")
    monkeypatch.setattr(cfg, "load_schema", lambda: schema)
    config = {"studies": {"norms": {"kind": "weight_norms"}}}
    with pytest.raises(ConfigError, match=r"studies\.norms\.kind: no study kind 'weight_norms'"):
        validate(config)


def test_every_figure_kind_says_which_tables_it_draws():
    """``@register_figure(kind, tables=(...))``: the tables a kind draws (``()``: it reads a
    metric), so a figure pointed at another kind's table fails before any job."""
    from pipeline.plots import register_figure

    entries = register_figure.entries()
    assert entries
    undeclared = sorted(k for k, e in entries.items() if "tables" not in e.meta)
    assert not undeclared, f"declare tables=(...) on {undeclared}"


def test_a_figure_drawing_a_table_its_kind_does_not_draw_is_refused_by_key():
    config = load(ROOT / "config" / "config.yaml")
    figure = config["studies"]["modules_addmul"]["figures"]["modules_addmul_iou"]
    assert figure["kind"] == "mask_iou"
    figure["table"] = "sharing"  # a table the study builds, drawn by mask_sharing figures
    with pytest.raises(ConfigError, match=r"modules_addmul_iou\.table: a mask_iou figure draws"):
        validate(config)
