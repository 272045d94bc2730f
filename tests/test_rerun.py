"""What an edit re-runs, by dry runs of the embedded default after it (issue 12).

The finished state is built without running anything: every job's outputs are created empty and
``snakemake --touch --forceall`` records them done, with their params (so the code fingerprints
Snakemake compares, and ``.snakemake/code/<fingerprint>.txt``, each job's closure). Then each edit
goes into the copy's ``src/pipeline``, and a dry run must list exactly the jobs whose closure holds
the edited definition (reason: their ``code`` param changed, and only the edited definition's line
differs between the two closure files) and everything downstream of them (reason: updated inputs).
"""

from __future__ import annotations

import ast
import base64
import json
import random
import re
import shutil
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import pytest
import yaml
from conftest import copy_workflow, snakemake

pytestmark = pytest.mark.slow

SEED = 3  # fixes the sample of edits
MAX_EDITS = 40  # the sample's size at most (issue 12)


@dataclass
class Job:
    rule: str
    outputs: list[str]
    inputs: list[str]
    wildcards: str
    closure: set[str] = field(default_factory=set)
    code: str | None = None


def parse_jobs(dry_run: str) -> list[dict]:
    """The job blocks of a dry run: rule, input, output, reason, wildcards."""
    jobs = []
    for block in re.split(r"^\[.*\]\n(?=(?:local)?rule )", dry_run, flags=re.M)[1:]:
        job = {"rule": re.match(r"(?:local)?rule (\w+):", block).group(1)}
        for key in ("input", "output", "reason", "wildcards"):
            m = re.search(rf"^    {key}: (.*)$", block, re.M)
            job[key] = m.group(1) if m else ""
        jobs.append(job)
    return jobs


def _files(text: str) -> list[str]:
    return [f.strip() for f in text.split(",") if f.strip()]


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    """``(directory, jobs)``: the default workflow, every job recorded done, none run."""
    wf = copy_workflow(tmp_path_factory.mktemp("touched") / "wf")
    probe = wf.parent / "probe"  # reports whether parsing the workflow imported torch
    probe.mkdir()
    (probe / "sitecustomize.py").write_text(
        "import atexit, os, sys\n"
        "atexit.register(lambda: open(os.environ['TORCH_PROBE'], 'w').write("
        "str('torch' in sys.modules)))\n"
    )
    env = {"PYTHONPATH": str(probe), "TORCH_PROBE": str(probe / "torch")}
    plan = [j for j in parse_jobs(snakemake(wf, "-n", env=env).stdout) if j["rule"] != "all"]
    assert (probe / "torch").read_text() == "False"
    for job in plan:
        for out in _files(job["output"]):
            path = wf / out
            if "." in path.name:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.touch()
            else:  # a directory() output (mask stages, mask tables)
                path.mkdir(parents=True, exist_ok=True)
    snakemake(wf, "--touch", "--forceall", "--cores", "1", "--quiet")
    assert "Nothing to be done" in snakemake(wf, "-n").stdout
    jobs = []
    for job in plan:
        outputs = _files(job["output"])
        key = base64.urlsafe_b64encode(outputs[0].encode()).decode()  # Snakemake's record
        meta = wf / ".snakemake" / "metadata" / key
        params = json.loads(meta.read_text())["params"]
        codes = [m.group(1) for p in params if (m := re.fullmatch(r"'code:(\w+)'", p))]
        assert len(codes) == 1, f"{job['rule']} {outputs[0]}: code param {codes}"
        closure = (wf / ".snakemake" / "code" / f"{codes[0]}.txt").read_text().split("\n")
        jobs.append(
            Job(
                job["rule"],
                outputs,
                _files(job["input"]),
                job["wildcards"],
                {line.split(" ")[0] for line in closure if line},
                codes[0],
            )
        )
    return wf, jobs


# -- edits ------------------------------------------------------------------------------------
def module_file(wf: Path, module: str) -> Path:
    path = wf.joinpath("src", *module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def editable_functions(wf: Path, unit: str) -> list[str]:
    """Qualified names of the functions (or methods) of a unit ``module:name`` that an edit can
    enter: a body statement on a line of its own after the docstring."""
    module, name = unit.rsplit(":", 1)
    if not module.startswith("pipeline.") or name.startswith("<") or "." in name:
        return []
    return _editable(module_file(wf, module)).get(name, [])


@cache
def _editable(path: Path) -> dict[str, list[str]]:
    out = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.FunctionDef) and _insertion(node):
            out[node.name] = [node.name]
        elif isinstance(node, ast.ClassDef):
            methods = [f for f in node.body if isinstance(f, ast.FunctionDef) and _insertion(f)]
            out[node.name] = [f"{node.name}.{f.name}" for f in methods]
    return out


def _insertion(fn: ast.FunctionDef) -> tuple[int, int] | None:
    body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
    if not body:
        return None
    stmt = body[0]
    line = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
    return (line, stmt.col_offset) if line > fn.lineno and line > fn.body[0].lineno - 1 else None


def _function(text: str, qualname: str) -> ast.FunctionDef:
    body = ast.parse(text).body
    for part in qualname.split("."):
        node = next(n for n in body if getattr(n, "name", None) == part)
        body = node.body
    return node


def code_edit(text: str, qualname: str) -> str:
    line, col = _insertion(_function(text, qualname))
    lines = text.splitlines(keepends=True)
    lines.insert(line - 1, " " * col + "_edited = 1\n")
    return "".join(lines)


def docstring_edit(text: str, qualname: str) -> str:
    fn = _function(text, qualname)
    lines = text.splitlines(keepends=True)
    i = fn.body[0].lineno - 1
    quote = lines[i].index('"""')
    lines[i] = lines[i][: quote + 3] + "Edited. " + lines[i][quote + 3 :]
    lines.insert(fn.lineno - 1, " " * fn.col_offset + "# a comment\n")
    return "".join(lines)


class Edits:
    """Edits to the copy's sources, undone on exit."""

    def __init__(self, wf: Path):
        self.wf, self.saved = wf, {}

    def apply(self, module: str, edit, *args) -> None:
        path = module_file(self.wf, module)
        text = path.read_text()
        self.saved.setdefault(path, text)
        path.write_text(edit(text, *args))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for path, text in self.saved.items():
            path.write_text(text)


# -- checks -----------------------------------------------------------------------------------
def downstream(jobs: list[Job], changed: list[Job]) -> list[Job]:
    """Every job that reads, directly or not, an output of a changed job (changed excluded)."""
    reached = {id(j) for j in changed}
    outputs = {o for j in changed for o in j.outputs}
    grew = True
    while grew:
        grew = False
        for job in jobs:
            if id(job) not in reached and any(i in outputs for i in job.inputs):
                reached.add(id(job))
                outputs.update(job.outputs)
                grew = True
    return [j for j in jobs if id(j) in reached and j not in changed]


def check_dry_run(wf: Path, jobs: list[Job], units: list[str], what: str, frozen=()) -> None:
    """The dry run after editing ``units`` lists their holders (code changed, exactly those
    units' lines differ) but the ``frozen`` ones, and the holders' downstream (updated inputs),
    and no other job."""
    holders = [j for j in jobs if any(u in j.closure for u in units) and j not in frozen]
    expected = holders + downstream(jobs, holders)
    out = snakemake(wf, "-n").stdout
    if not expected:
        assert "Nothing to be done" in out, f"{what}: expected no job"
        return
    listed = {_files(j["output"])[0]: j for j in parse_jobs(out) if j["rule"] != "all"}
    want = {j.outputs[0]: j for j in expected}
    assert set(listed) == set(want), (
        f"{what}: unexpected {sorted(set(listed) - set(want))}, "
        f"missing {sorted(set(want) - set(listed))}"
    )
    code = wf / ".snakemake" / "code"
    produced = {o for j in expected for o in j.outputs}
    below = {j.outputs[0] for j in expected if any(i in produced for i in j.inputs)}
    for out_file, job in want.items():
        reason = listed[out_file]["reason"]
        if out_file in below and reason.startswith("Input files updated by another job"):
            continue  # Snakemake compares params only of jobs whose inputs are unchanged
        if job in holders:
            m = re.search(r"before: 'code:(\w+)' now: 'code:(\w+)'", reason)
            assert m and m.group(1) == job.code, f"{what}: {out_file}: {reason}"
            old = set((code / f"{m.group(1)}.txt").read_text().splitlines())
            new = set((code / f"{m.group(2)}.txt").read_text().splitlines())
            assert {line.split(" ")[0] for line in old ^ new} == set(units) & job.closure, what
        else:
            assert reason.startswith("Input files updated by another job"), f"{what}: {reason}"


def sample_edits(wf: Path, jobs: list[Job]) -> list[tuple[str, str]]:
    """``(unit, qualname)``: the cases of issue 12, then for one job of each category (training,
    each metric's cache, several figure kinds, one rule per science) a function of its closure,
    drawn with weight 1 / (number of jobs whose closure holds it), fixed seed."""
    rng = random.Random(SEED)
    holders: dict[str, int] = {}
    for job in jobs:
        for unit in job.closure:
            holders[unit] = holders.get(unit, 0) + 1
    edits = [
        ("pipeline.mechanics.theory:discrete_sgd", "discrete_sgd"),  # reached as theory.f()
        ("pipeline.plots.mechanics:conservation", "conservation"),
        ("pipeline.mechanics.cache:cache_metric", "cache_metric"),
        ("pipeline.train.loop:train_run", "train_run"),
    ]
    categories: dict[str, list[Job]] = {}
    for job in jobs:
        rule = re.sub(r"_chunk\d+$", "", job.rule)
        key = rule if rule.startswith(("train", "zoo_")) else job.rule
        if job.rule == "cache":
            key = job.wildcards
        categories.setdefault(key, []).append(job)
    kinds = yaml.safe_load((wf / "config" / "config.yaml").read_text())
    kind = {
        fig: spec["kind"]
        for s in kinds["studies"].values()
        for fig, spec in s.get("figures", {}).items()
    }
    plots = categories.pop("plot")
    by_kind: dict[str, Job] = {}
    for job in plots:
        by_kind.setdefault(kind[job.outputs[0].split("/")[-1][: -len(".pdf")]], job)
    figures = min(6, MAX_EDITS - len(edits) - len(categories))  # every other category is drawn
    assert figures >= 3, f"{len(categories)} categories leave room for {figures} figure kinds"
    for name in rng.sample(sorted(by_kind), figures):
        categories[f"plot {name}"] = [by_kind[name]]
    for key in sorted(categories):
        job = rng.choice(categories[key])
        chosen = {u for u, _ in edits}
        units = sorted(u for u in job.closure if editable_functions(wf, u) and u not in chosen)
        unit = rng.choices(units, weights=[1 / holders[u] for u in units])[0]
        edits.append((unit, rng.choice(editable_functions(wf, unit))))
    assert len(edits) <= MAX_EDITS
    return edits


def test_each_edit_reruns_exactly_its_jobs_and_their_downstream(done):
    wf, jobs = done
    edits = sample_edits(wf, jobs)
    groups: list[list[tuple[str, str]]] = []  # edits whose holders are disjoint share a dry run
    held = {u: {id(j) for j in jobs if u in j.closure} for u, _ in edits}
    for unit, qualname in edits:
        for group in groups:
            if all(not (held[unit] & held[u]) and u != unit for u, _ in group):
                group.append((unit, qualname))
                break
        else:
            groups.append([(unit, qualname)])
    assert len(edits) >= 30
    for group in groups:
        with Edits(wf) as edit:
            for unit, qualname in group:
                edit.apply(unit.rsplit(":", 1)[0], code_edit, qualname)
            check_dry_run(wf, jobs, [u for u, _ in group], f"edits {group}")
    assert "Nothing to be done" in snakemake(wf, "-n").stdout


def test_docstring_edits_and_edits_outside_every_closure_rerun_nothing(done):
    wf, jobs = done
    rng = random.Random(SEED)
    reached = set().union(*(j.closure for j in jobs))
    modules = sorted({u.split(":")[0] for u in reached if u.startswith("pipeline.")})
    outside, documented = [], []
    for module in modules:
        lines = module_file(wf, module).read_text().splitlines()
        for node in ast.parse("\n".join(lines)).body:
            if isinstance(node, ast.FunctionDef) and _insertion(node):
                if f"{module}:{node.name}" not in reached:
                    outside.append((module, node))
                elif ast.get_docstring(node) and '"""' in lines[node.body[0].lineno - 1]:
                    documented.append((module, node))
    assert outside, "every function is in some job's closure"
    with Edits(wf) as edit:
        for module, node in rng.sample(outside, 5):
            edit.apply(module, code_edit, node.name)
        for module, node in rng.sample(documented, 10):
            edit.apply(module, docstring_edit, node.name)
        check_dry_run(wf, jobs, [], "docstring edits and edits outside every closure")


def test_a_hyperparameter_default_reruns_only_the_jobs_that_read_it(done):
    wf, jobs = done
    anchor = '    mechanics: bool = _h("log the per-step per-neuron trace'
    with Edits(wf) as edit:  # a new field with a default: nothing
        edit.apply(
            "pipeline.config",
            lambda t: t.replace(
                anchor, '    label_noise: float = _h("noise", default=0.0)\n' + anchor
            ),
        )
        check_dry_run(wf, jobs, [], "a new hyperparameter")
    field_ = "pipeline.config:TrainHparams.plateau_patience"
    readers = [j for j in jobs if field_ in j.closure]
    assert {j.rule for j in readers} >= {"train", "train_traced"}
    with Edits(wf) as edit:  # a changed default: the jobs whose code reads the field
        drop = 'before a drop", default=10)'
        edit.apply("pipeline.config", lambda t: t.replace(drop, drop.replace("10", "11")))
        check_dry_run(wf, jobs, [field_], "a changed default")


def test_frozen_training_reruns_on_no_code_change(done, tmp_path):
    """``rerun_on_code_change: false`` on the mechanics study: switching it on changes its
    training jobs' params once (accepted with --touch); then an edit of the training loop
    re-runs every other training job and what follows, never the mechanics runs."""
    wf = tmp_path / "wf"
    shutil.copytree(done[0], wf)  # (copies keep modification times)
    jobs = done[1]
    path = wf / "config" / "config.yaml"
    config = yaml.safe_load(path.read_text())
    config["studies"]["mechanics"]["rerun_on_code_change"] = False
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    frozen = [j for j in jobs if j.rule == "train_traced"]
    assert len(frozen) == 4
    listed = parse_jobs(snakemake(wf, "-n").stdout)
    want = {j.outputs[0] for j in frozen + downstream(jobs, frozen)}
    assert {_files(j["output"])[0] for j in listed if j["rule"] != "all"} == want
    for job in listed:
        if job["rule"] == "train_traced":
            assert re.search(r"before: 'code:\w+' now: <nothing exclusive>", job["reason"])
    snakemake(wf, "--touch", "--cores", "1", "--quiet")
    with Edits(wf) as edit:  # (a touch that recorded nothing would list the mechanics runs here)
        edit.apply("pipeline.train.loop", code_edit, "train_run")
        check_dry_run(wf, jobs, ["pipeline.train.loop:train_run"], "frozen mechanics", frozen)


def test_a_missing_name_stops_the_dry_run_naming_module_and_name(done):
    wf, _ = done
    with Edits(wf) as edit:
        edit.apply(
            "pipeline.mechanics.metrics",
            lambda t: t.replace("theory.discrete_sgd(", "theory.discrete_sgdd(", 1),
        )
        proc = snakemake(wf, "-n", check=False)
    assert proc.returncode != 0
    assert (
        "code fingerprint of workflow/scripts/cache.py: pipeline.mechanics.metrics: "
        "theory.discrete_sgdd: module pipeline.mechanics.theory has no name 'discrete_sgdd'"
    ) in proc.stdout + proc.stderr
