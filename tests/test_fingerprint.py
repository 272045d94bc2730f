"""Code fingerprints (pipeline.fingerprint): exactly the code a job runs, never the text.

Edits go to a private copy of ``src/pipeline`` and ``workflow/scripts``; every check compares the
fingerprints of a set of jobs (the default config's scripts, with their configurations) before and
after. The workflow-level checks (a dry run after each edit) are in test_rerun.py.
"""

from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import subprocess
import sys
from inspect import CO_NEWLOCALS
from itertools import pairwise
from pathlib import Path

import pytest

from pipeline import config as cfg
from pipeline import fingerprint as fp
from pipeline import registry, studies

ROOT = Path(__file__).resolve().parents[1]
SEED = 12  # the sample of edited functions is fixed


# -- a private copy of the package --------------------------------------------------------------
class Copy:
    def __init__(self, tmp: Path):
        self.src = tmp / "src" / "pipeline"
        self.scripts = tmp / "scripts"
        fp.code_fingerprint("pipeline.jobs:run_step")  # fills the analysis caches to copy
        skip = shutil.ignore_patterns("*.pyc")  # (the analyses are keyed by the bytes: still valid)
        shutil.copytree(ROOT / "src" / "pipeline", self.src, ignore=skip)
        shutil.copytree(ROOT / "workflow" / "scripts", self.scripts, ignore=skip)
        self.saved: dict[Path, str] = {}

    def file(self, module: str) -> Path:
        path = self.src.joinpath(*module.split(".")[1:])
        return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")

    def module(self, path: Path) -> str:
        if path.parent == self.scripts:
            return f"script:{path.resolve()}"
        rel = path.relative_to(self.src.parent).with_suffix("")
        return ".".join(p for p in rel.parts if p != "__init__")

    def write(self, path: Path, text: str) -> None:
        self.saved.setdefault(path, path.read_text())
        path.write_text(text)
        fp.clear_caches([self.module(path)])

    def restore(self) -> None:
        for path, text in self.saved.items():
            path.write_text(text)
        fp.clear_caches([self.module(path) for path in self.saved])
        self.saved.clear()


@pytest.fixture
def package(tmp_path, monkeypatch):
    copy = Copy(tmp_path)
    monkeypatch.setattr(registry, "PACKAGE_ROOT", copy.src)
    fp.clear_caches()
    yield copy
    fp.clear_caches()


# -- the jobs of the default config -----------------------------------------------------------
def default_jobs(scripts: Path) -> dict[str, tuple]:
    """``label -> (script, config, choose)``: one job per training study, cache metric, figure
    kind, and every other script with the whole default config as its configuration."""
    config = cfg.load(ROOT / "config" / "config.yaml")
    plan = studies.Plan.from_config(config)
    jobs = {}
    for study, runs in plan.runs.items():
        if runs and plan.study(study)["kind"] == "train":
            script = (
                "train_chunk.py" if plan.study(study).get("runs_per_job", 1) > 1 else "train.py"
            )
            jobs[f"train {study}"] = (scripts / script, [r.hparams for r in runs], {})
    everything = fp.strings(config)
    for metric in plan.study("mechanics")["metrics"]:
        jobs[f"cache {metric}"] = (scripts / "cache.py", everything, {"register_metric": metric})
    for kind in sorted({spec["kind"] for _, spec in plan.figures().values()}):
        jobs[f"plot {kind}"] = (scripts / "plot.py", everything, {"register_figure": kind})
    for similarity in ("linear_cka", "weight_matching"):
        choose = {"register_similarity": similarity}
        jobs[f"alignment {similarity}"] = (scripts / "alignment.py", everything, choose)
    for layer in ("linear", "permutation"):
        choose = {"register_stitching_layer": layer}
        jobs[f"stitching {layer}"] = (scripts / "stitching.py", everything, choose)
    for script in sorted(scripts.glob("*.py")):
        if script.stem not in ("train", "train_chunk", "cache", "plot", "alignment", "stitching"):
            jobs[script.stem] = (script, everything, {})
    return jobs


def fingerprints(jobs) -> dict[str, str]:
    return {label: fp.code_fingerprint(str(s), c, **k) for label, (s, c, k) in jobs.items()}


def closures(jobs) -> dict[str, set[str]]:
    return {label: set(fp.code_closure(str(s), c, **k)) for label, (s, c, k) in jobs.items()}


# -- edits ------------------------------------------------------------------------------------
def functions(src: Path) -> list[tuple[str, str, str, Path]]:
    """``(module, unit, qualname, file)`` of every top-level function and method whose body
    starts on a line of its own (the unit: the function, or the method's class)."""
    out = []
    for path in sorted(src.rglob("*.py")):
        rel = path.relative_to(src.parent).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        for node in ast.parse(path.read_text()).body:
            candidates = [(node.name, node)] if isinstance(node, ast.FunctionDef) else []
            if isinstance(node, ast.ClassDef):
                candidates = [
                    (f"{node.name}.{f.name}", f)
                    for f in node.body
                    if isinstance(f, ast.FunctionDef)
                ]
            for qualname, fn in candidates:
                if _first_statement(fn) is not None:
                    out.append((module, qualname.split(".")[0], qualname, path))
    return out


def _find(path: Path, qualname: str) -> ast.FunctionDef:
    body = ast.parse(path.read_text()).body
    for part in qualname.split("."):
        node = next(n for n in body if getattr(n, "name", None) == part)
        body = node.body
    return node


def _first_statement(fn: ast.FunctionDef):
    """The first statement after the docstring, if it starts on a line below the header."""
    body = fn.body[1:] if ast.get_docstring(fn) is not None else fn.body
    if not body:
        return None
    stmt = body[0]
    line = min([stmt.lineno] + [d.lineno for d in getattr(stmt, "decorator_list", [])])
    return (line, stmt.col_offset) if line > fn.body[0].lineno - 1 and line > fn.lineno else None


def code_edit(text: str, path: Path, qualname: str) -> str:
    """Insert an assignment as the function's first statement (after its docstring)."""
    line, col = _first_statement(_find(path, qualname))
    lines = text.splitlines(keepends=True)
    lines.insert(line - 1, " " * col + "_edited = 1\n")
    return "".join(lines)


def text_edit(text: str, path: Path, qualname: str) -> str:
    """Reword the docstring (if any) and add a comment line above the function."""
    fn = _find(path, qualname)
    lines = text.splitlines(keepends=True)
    if ast.get_docstring(fn) is not None:
        i = fn.body[0].lineno - 1
        quote = min(q for q in (lines[i].find('"'), lines[i].find("'")) if q >= 0)
        lines[i] = lines[i][: quote + 3] + "Edited. " + lines[i][quote + 3 :]
    first = min([fn.lineno] + [d.lineno for d in fn.decorator_list])
    lines.insert(first - 1, " " * fn.col_offset + "# an edited comment\n")
    return "".join(lines)


# -- the rule -----------------------------------------------------------------------------------
def test_a_code_edit_changes_exactly_the_jobs_whose_closure_holds_it(package):
    """Edits inside a fixed-seed sample of functions (and the cases of issue 12: a theory
    function reached as ``theory.f()``, a figure, the figure driver, the cache driver, the
    training loop, the script glue): a job's fingerprint changes iff its closure holds the
    edited definition."""
    jobs = default_jobs(package.scripts)
    before, closure = fingerprints(jobs), closures(jobs)
    everywhere = set.union(*closure.values())
    pool = [f for f in functions(package.src) if f"{f[0]}:{f[1]}" in everywhere]
    named = {
        ("pipeline.mechanics.theory", "discrete_sgd"): {"cache rescale", "cache scale"},
        ("pipeline.plots.mechanics", "conservation"): {"plot conservation"},
        ("pipeline.plots", "draw"): {j for j in jobs if j.startswith("plot")},
        ("pipeline.mechanics.cache", "cache_metric"): {j for j in jobs if j.startswith("cache")},
        ("pipeline.train.loop", "train_run"): {j for j in jobs if j.startswith("train")},
        ("pipeline.jobs", "run_step"): set(jobs),
    }
    sample = [f for f in pool if (f[0], f[2]) in named]
    assert len(sample) == len(named)
    sample += random.Random(SEED).sample(pool, 30)
    for module, unit, qualname, path in sample:
        package.write(path, code_edit(path.read_text(), path, qualname))
        after = fingerprints(jobs)
        package.restore()
        changed = {j for j in jobs if after[j] != before[j]}
        holding = {j for j in jobs if f"{module}:{unit}" in closure[j]}
        assert changed == holding, f"edit in {module}.{qualname}"
        assert changed >= named.get((module, qualname), set()), f"edit in {module}.{qualname}"
        assert changed, f"{module}.{qualname} is in no job's closure"
    assert fingerprints(jobs) == before


def test_docstring_and_comment_edits_change_nothing(package):
    jobs = default_jobs(package.scripts)
    before = fingerprints(jobs)
    sample = random.Random(SEED).sample(functions(package.src), 40)
    for _, _, qualname, path in sample:  # all at once: fingerprints must not move at all
        package.write(path, text_edit(path.read_text(), path, qualname))
    for path in package.scripts.glob("*.py"):
        package.write(path, path.read_text().replace('"""', '"""Edited. ', 1) + "# comment\n")
    assert fingerprints(jobs) == before


def test_a_registry_lookup_reaches_only_the_chosen_entries(package):
    jobs = default_jobs(package.scripts)
    closure = closures(jobs)
    assert "pipeline.mechanics.metrics:rescale" in closure["cache rescale"]
    assert "pipeline.mechanics.metrics:scale" not in closure["cache rescale"]
    assert "pipeline.plots.mechanics:performance" not in closure["plot conservation"]
    train = closure["train mechanics"]
    assert {"pipeline.models.small:mlp", "pipeline.data.sources:digits"} <= train
    assert not any(u.startswith("pipeline.models.resnet:") for u in train)
    assert not any(u.startswith("pipeline.teleport.") for u in train)  # no teleport section
    teleport = closure["train teleport_sgd"]
    assert "pipeline.teleport.training:teleport_extension" in teleport
    # a configuration naming an unregistered entry fails, naming it
    with pytest.raises(fp.CodeError, match="no entry 'nope'.*registered: .*rescale"):
        fp.code_fingerprint(str(package.scripts / "cache.py"), register_metric="nope")


def test_missing_names_fail_naming_module_and_name(package):
    with pytest.raises(fp.CodeError, match=r"pipeline\.mechanics\.theory has no name 'nope'"):
        fp.code_fingerprint("pipeline.mechanics.theory:nope")
    metrics = package.file("pipeline.mechanics.metrics")
    cache = str(package.scripts / "cache.py")
    text = metrics.read_text()
    assert "theory.discrete_sgd(" in text
    package.write(metrics, text.replace("theory.discrete_sgd(", "theory.discrete_sgdd(", 1))
    with pytest.raises(fp.CodeError, match=r"theory\.discrete_sgdd.*no name 'discrete_sgdd'"):
        fp.code_fingerprint(cache, register_metric="rescale")
    package.restore()
    package.write(metrics, text.replace("import theory", "import theory, theorems", 1))
    with pytest.raises(fp.CodeError, match=r"pipeline\.mechanics\.metrics.*'theorems'"):
        fp.code_fingerprint(cache, register_metric="rescale")
    package.restore()
    with pytest.raises(fp.CodeError, match="no script"):
        fp.code_fingerprint(str(package.scripts / "nope.py"))


def _hparams_fields(section: str) -> list[str]:
    return list(cfg.defaults(section))


def test_hyperparameter_defaults_count_through_the_code_that_reads_them(package):
    """Adding a field with a default changes no fingerprint; changing a default changes exactly
    the jobs whose code names the field; every core field is named by the training code."""
    jobs = default_jobs(package.scripts)
    before, closure = fingerprints(jobs), closures(jobs)
    config = package.file("pipeline.config")
    text = config.read_text()
    anchor = '    mechanics: bool = _h("log the per-step per-neuron trace'
    assert anchor in text
    added = '    label_noise: float = _h("fraction of training labels replaced", default=0.0)\n'
    package.write(config, text.replace(anchor, added + anchor))
    assert fingerprints(jobs) == before
    package.restore()
    # every field of the core sections is read by the training code, so its default counts
    train = "train mechanics"
    for section, cls in (("train", "TrainHparams"), ("checkpoints", "CheckpointHparams")):
        named = {
            u.split(".")[-1] for u in closure[train] if u.startswith(f"pipeline.config:{cls}.")
        }
        assert named == set(_hparams_fields(section)), section
    # a changed default re-runs the jobs whose code reads the field: training, not the figures
    package.write(config, text.replace('default="val_accuracy"', 'default="val_loss"', 1))
    after = fingerprints(jobs)
    changed = {j for j in jobs if after[j] != before[j]}
    reading = {j for j in jobs if "pipeline.config:TrainHparams.plateau_metric" in closure[j]}
    assert changed == reading and train in changed
    assert not any(j.startswith("plot") for j in changed)


def test_fingerprinting_imports_no_torch_and_uses_its_cache(tmp_path):
    code = f"""
import pathlib, sys, time
sys.path.insert(0, {str(ROOT / "src")!r})
from pipeline import fingerprint as fp
start = time.process_time()
for script in sorted(pathlib.Path({str(ROOT / "workflow" / "scripts")!r}).glob("*.py")):
    fp.code_fingerprint(str(script), ["mlp", "digits"])
print("torch" in sys.modules, time.process_time() - start)
"""
    outs = [
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        for _ in range(2)
    ]
    imported, seconds = outs[-1].stdout.split()
    assert imported == "False"
    assert float(seconds) < 2.0  # from the __pycache__ analyses: no parsing


def test_the_analysis_cache_follows_the_bytes(package):
    """Edits of equal size and modification time still reach the fingerprint."""
    theory = package.file("pipeline.mechanics.theory")
    target = "pipeline.mechanics.theory:discrete_sgd"
    before = fp.code_fingerprint(target)
    stat = theory.stat()
    text = theory.read_text()
    fn = _find(theory, "discrete_sgd")
    edited = text.replace(
        ast.get_source_segment(text, fn), ast.get_source_segment(text, fn).replace("1 -", "1 +", 1)
    )
    assert edited != text and len(edited) == len(text)
    package.write(theory, edited)
    os.utime(theory, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert fp.code_fingerprint(target) != before
    cached = list((theory.parent / "__pycache__").glob("theory.*.json"))
    assert cached and json.loads(cached[0].read_text())["module"] == "pipeline.mechanics.theory"


# -- the closure against the code that runs --------------------------------------------------------
def _executed(fn, *args, **kwargs) -> set[str]:
    """``module:unit`` of every ``pipeline`` function that runs during ``fn(...)``."""
    package = str(registry.PACKAGE_ROOT)
    seen: set[tuple[str, str]] = set()

    def profile(frame, event, arg):
        code = frame.f_code
        # functions only: a class body or a module running at import is not a call
        if (
            event == "call"
            and code.co_flags & CO_NEWLOCALS
            and code.co_filename.startswith(package)
        ):
            seen.add((code.co_filename, code.co_qualname))

    sys.setprofile(profile)
    try:
        fn(*args, **kwargs)
    finally:
        sys.setprofile(None)
    units = set()
    for filename, qualname in seen:
        rel = Path(filename).relative_to(registry.PACKAGE_ROOT.parent).with_suffix("")
        module = ".".join(p for p in rel.parts if p != "__init__")
        top = qualname.split(".")[0]
        if module != fp.SELF and not top.startswith("<"):  # "<module>": import-time code
            units.add(f"{module}:{top}")
    return units


def test_the_closure_holds_every_function_a_job_runs(tmp_path):
    """A tiny mechanics run, its extract, a metric's cache and its figure, and a teleported run,
    traced: every ``pipeline`` function that ran is in the job's static closure."""
    from pipeline.extract import extract_run
    from pipeline.mechanics.cache import cache_metric
    from pipeline.plots import draw
    from pipeline.train.extensions import train

    study = cfg.load(ROOT / "config" / "config.yaml")["studies"]["mechanics"]
    study = {**study, "sweep": {}, "train": {**study["train"], "epochs": 1}}
    run = cfg.expand_runs("m", study)[0]
    root = tmp_path / "run"
    ran = _executed(train, root, run.hparams, progress=False)
    assert "pipeline.train.loop:train_run" in ran
    covered(ran, "pipeline.train.extensions:train", run.hparams)
    assert io_read(root)["code"] == fp.code_fingerprint(
        "pipeline.train.extensions:train", run.hparams
    )

    ran = _executed(extract_run, root, tmp_path / "run.h5")
    covered(ran, "pipeline.extract:extract_run", study)
    runs = [
        {"name": "r", "run_dir": root, "extract": tmp_path / "run.h5", "trace": root / "trace.h5"}
    ]
    tables = tmp_path / "rescale.parquet", tmp_path / "rescale.summary.parquet"
    ran = _executed(cache_metric, "rescale", runs, *tables)
    choose = {"register_metric": "rescale"}
    covered(ran, "pipeline.mechanics.cache:cache_metric", study, **choose)
    spec = {"kind": "conservation", "metric": "rescale"}
    ran = _executed(draw, "conservation", *tables, spec, tmp_path / "f.pdf", tmp_path / "f.png")
    assert "pipeline.plots.mechanics:conservation" in ran
    covered(ran, "pipeline.plots:draw", spec, register_figure="conservation")

    teleport = cfg.load(ROOT / "config" / "config.yaml")["studies"]["teleport_sgd"]
    teleport = {**teleport, "sweep": {"teleport.mode": ["teleport"]}, "seeds": [0]}
    teleport["model"] = {"name": "mlp", "widths": [8]}
    teleport["train"] = {**teleport["train"], "epochs": 1}
    run = cfg.expand_runs("t", teleport)[0]
    ran = _executed(train, tmp_path / "teleported", run.hparams, progress=False)
    assert "pipeline.teleport.training:teleport_extension" in ran
    covered(ran, "pipeline.train.extensions:train", run.hparams)


def covered(ran: set[str], target: str, config=None, **choose) -> None:
    missing = ran - set(fp.code_closure(target, config, **choose))
    assert not missing, f"{target}: ran outside its closure: {sorted(missing)}"


def io_read(root: Path) -> dict:
    return json.loads((root / "summary.json").read_text())


# -- training that does not re-run on code changes ------------------------------------------------
def test_stale_lists_the_frozen_jobs_whose_code_changed_and_accept_keeps_mtimes(
    tmp_path, monkeypatch, capsys
):
    from pipeline import stale
    from pipeline.modelsym import study as zoo_study

    model = {"name": "mlp", "widths": [4]}
    config = {
        "studies": {
            "frozen": {
                "kind": "train",
                "dataset": {"name": "digits"},
                "model": model,
                "seeds": [0, 1, 2, 3],
                "rerun_on_code_change": False,
            },
            "tracked": {"kind": "train", "dataset": {"name": "digits"}, "model": model},
            "zoo": {
                "kind": "modelsym",
                "dataset": {"name": "digits"},
                "rerun_on_code_change": False,
                "zoos": {"z": {"model": model, "seeds": [0, 1], "vectorised": True}},
            },
        }
    }
    plan = studies.Plan.from_config(config)
    runs = plan.runs["frozen"]
    current = fp.code_fingerprint("pipeline.train.extensions:train", runs[0].hparams)
    for run, code in zip(runs[:3], [current, "0" * 16, None], strict=True):  # runs[3]: untrained
        summary = tmp_path / "results" / "frozen" / "runs" / run.name / "summary.json"
        summary.parent.mkdir(parents=True)
        summary.write_text(json.dumps({"status": "completed"} | ({"code": code} if code else {})))
    tracked = tmp_path / "results" / "tracked" / "runs" / plan.runs["tracked"][0].name
    tracked.mkdir(parents=True)
    (tracked / "summary.json").write_text(json.dumps({"code": "0" * 16}))  # Snakemake's business
    chunk = tmp_path / "results" / "zoo" / "zoo" / "z" / "chunk~0" / "summary.json"
    chunk.parent.mkdir(parents=True)
    chunk.write_text(json.dumps({"code": "1" * 16}))
    assert zoo_study.chunks(plan.study("zoo"), "z") == [[0, 1]]

    found = stale.stale_jobs(plan, tmp_path)
    assert [job.output for job in found] == [
        f"results/frozen/runs/{runs[1].name}/final.pt",
        f"results/frozen/runs/{runs[2].name}/final.pt",
        "results/zoo/zoo/z/chunk~0/summary.json",
    ]
    assert [job.recorded for job in found] == ["0" * 16, None, "1" * 16]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "config.yaml").write_text(json.dumps(config))
    stale.main(["--configfile", "config.yaml"])
    out = capsys.readouterr()
    assert out.out.split() == [job.output for job in found]
    assert "3 stale training job(s)" in out.err and "1 trained before" in out.err
    before = [job.summary.stat().st_mtime_ns for job in found]
    stale.main(["--configfile", "config.yaml", "--accept"])
    assert [job.summary.stat().st_mtime_ns for job in found] == before  # nothing downstream moves
    assert stale.stale_jobs(plan, tmp_path) == []


# -- every rule carries its code ----------------------------------------------------------------
#: param helpers (rules/common.smk) that name their script themselves
TRAINING_HELPERS = {
    "train_code": "train.py",
    "chunk_code": "train_chunk.py",
    "zoo_code": "zoo_train.py",
}


def test_every_rule_with_a_script_has_the_code_param_of_that_script():
    blocks = []
    for smk in sorted((ROOT / "rules").glob("*.smk")):
        text = smk.read_text()
        starts = [m.start() for m in re.finditer(r"^\s*(?:use rule|rule)\b.*:\s*$", text, re.M)]
        blocks += [(smk.name, text[a:b]) for a, b in pairwise([*starts, len(text)])]
    checked = 0
    for name, block in blocks:
        script = re.search(r'script:\s*"\.\./workflow/scripts/([\w.]+)"', block)
        if script is None:
            continue
        code = re.search(r'code=(?:code\("([\w.]+)"|(\w+))', block)
        header = block.strip().splitlines()[0]
        assert code, f"{name}: {header} runs {script.group(1)} but has no code= param"
        named = code.group(1) or TRAINING_HELPERS.get(code.group(2))
        assert named == script.group(1), f"{name}: {header}: code names {named}"
        checked += 1
    assert checked >= 25
