# All the Python of the workflow: the plan (pipeline.studies: each study kind plans its studies,
# validated before any job), wildcard constraints, code fingerprints, and input functions that
# ask the plan. Cheap at parse time: no torch, no file reads beyond the config (dry runs of 10,000
# jobs).
import inspect
import os
import re
import sys

# The jobs import the installed package (pip install -e .); the parser reads this checkout's.
sys.path.insert(0, os.path.join(workflow.basedir, "src"))

from pipeline.config import ConfigError  # noqa: E402
from pipeline.studies import Plan  # noqa: E402
from pipeline.metric_registry import register_metric  # noqa: E402
from pipeline.fingerprint import CodeError, Untracked, code_fingerprint, strings  # noqa: E402
from pipeline.registry import source_constant  # noqa: E402
from pipeline.layout import RUN_FILES, declared, run_dir, run_file, run_outputs  # noqa: E402

try:
    PLAN = Plan.from_config(config)
except ConfigError as err:
    raise WorkflowError(str(err)) from None

STUDIES = list(PLAN.kinds)
FIGURES = PLAN.figures()
DEVICE = config.get("device", "cpu")
THREADS = config.get("threads", 1)


def _alternatives(names):
    return "|".join(re.escape(n) for n in names) or "(?!)"


def studies(rule):
    """The ``study`` wildcard constraint of the rules of family ``rule``: the studies whose kind
    says the family applies (``pipeline.studies.StudyKind.rules``)."""
    return _alternatives(PLAN.having(rule))


wildcard_constraints:
    study=_alternatives(STUDIES),
    run=r"[^/]+~[^/]+(?:/[^/]+~[^/]+)*",
    metric=_alternatives(register_metric.names()),
    figure=_alternatives(FIGURES),


# -- targets (each study kind plans its own: pipeline.studies) -----------------------------------
def run_files(study):
    """The declared outputs of a run of ``study`` (file names in its directory)."""
    return [RUN_FILES[name] for name in declared(PLAN.kind(study).traced)]


#: (study, chunk index, runs) for studies that train ``runs_per_job`` runs per job
TRAIN_CHUNKS = [
    (study, index, runs)
    for study in PLAN.having("chunked")
    for index, runs in PLAN.kind(study).chunks()
]


# -- code fingerprints (the rule: pipeline/fingerprint.py, README "Re-runs") -------------------
try:
    from snakemake.common import overwrite_function_params
except ImportError:  # another Snakemake: its param functions are only slower

    def overwrite_function_params(func, params):
        pass


def per_job(fn):
    """``fn``, a param function, with its signature precomputed: Snakemake inspects it three
    times per job otherwise (seconds in a dry run of 10,000 jobs)."""
    overwrite_function_params(fn, inspect.signature(fn).parameters)
    return fn


SCRIPTS = os.path.join(workflow.basedir, "workflow", "scripts")
#: each fingerprint's closure, as <fingerprint>.txt: `diff` two to see what an edit changed
CODE_RECORDS = os.path.join(".snakemake", "code")
_STUDY_CONFIG = {}


def study_config(study):
    """A study's block and the blocks of the studies it names (e.g. a recovery teacher's): the
    configuration whose names select the registry entries (models, datasets...) of its jobs."""
    if study not in _STUDY_CONFIG:
        seen, todo = [], [study]
        while todo:
            name = todo.pop()
            if name not in seen:
                seen.append(name)
                todo += [s for s in strings(PLAN.study(name)) if s in PLAN.runs]
        _STUDY_CONFIG[study] = frozenset(s for name in seen for s in strings(PLAN.study(name)))
    return _STUDY_CONFIG[study]


def fingerprint(script, config, choose=None):
    """``"code:<hash>"`` of the pipeline code ``script`` runs (a WorkflowError if it names code
    that does not exist)."""
    try:
        path = os.path.join(SCRIPTS, script)
        digest = code_fingerprint(path, config, record=CODE_RECORDS, **(choose or {}))
        return f"code:{digest}"
    except CodeError as err:
        raise WorkflowError(f"code fingerprint of workflow/scripts/{script}: {err}") from None


def code(script, config=None, **choose):
    """A rule's ``code`` param: a function of the wildcards giving :func:`fingerprint`.

    ``config``: the job's configuration (a value, or a function of the wildcards; default: the
    study's, see :func:`study_config`); ``choose``: registry -> a function of the wildcards
    giving the entry the job uses (e.g. ``register_metric=lambda w: w.metric``).
    """

    def param(wildcards):
        cfg = config(wildcards) if callable(config) else config
        if cfg is None and "study" in wildcards.keys():
            cfg = study_config(wildcards.study)
        return fingerprint(script, cfg, {k: f(wildcards) for k, f in choose.items()})

    return per_job(param)


def tracks_code(study):
    """False for a study with ``rerun_on_code_change: false``: its training jobs get their code
    fingerprint as an :class:`Untracked` value, which Snakemake neither records nor compares."""
    return PLAN.study(study).get("rerun_on_code_change", True)


def training_code(study, runs, script):
    """The ``code`` param of a job training ``runs`` (their hyperparameters select the model,
    dataset and extension entries)."""
    value = fingerprint(script, [r.hparams for r in runs])
    return value if tracks_code(study) else Untracked(value)


# -- train ------------------------------------------------------------------------------------
@per_job
def train_params(wildcards):
    """Only the non-default hyperparameters: a new field with a default re-runs nothing."""
    return PLAN.run(wildcards.study, wildcards.run).nondefault


def study_resources(wildcards, key, default):
    return PLAN.study(wildcards.study).get("resources", {}).get(key, default)


@per_job
def train_code(wildcards):
    return training_code(wildcards.study, [PLAN.run(wildcards.study, wildcards.run)], "train.py")


def chunk_code(study, runs):
    return per_job(lambda wildcards: training_code(study, runs, "train_chunk.py"))


def summary_code(run):
    """What the run's ``summary.json`` records as ``code`` (see :mod:`pipeline.stale`), computed
    here rather than in each job (about 0.5 s a job)."""
    target = source_constant("pipeline.train.extensions", "TRAIN_CODE")  # (it imports torch)
    return code_fingerprint(target, run.hparams)


@per_job
def train_summary_code(wildcards):
    """:class:`Untracked`: the ``code`` param already re-runs the job when its code changes."""
    return Untracked(summary_code(PLAN.run(wildcards.study, wildcards.run)))


def chunk_summary_codes(runs):
    return per_job(lambda wildcards: Untracked(tuple(summary_code(r) for r in runs)))


def train_threads(wildcards):
    return study_resources(wildcards, "threads", THREADS)


# -- cache ------------------------------------------------------------------------------------
def metric_needs(metric):
    return register_metric.entry(metric).meta.get("needs", ("history",))


def cache_inputs(wildcards):
    """The files the metric declares it needs (``@register_metric(name, needs=...)``)."""
    study, runs = wildcards.study, PLAN.runs[wildcards.study]
    needs = metric_needs(wildcards.metric)
    inputs = {"summary": [run_file(study, r.name, "summary") for r in runs]}
    if "extract" in needs:
        inputs["extract"] = [f"results/{study}/extract/{r.name}.h5" for r in runs]
    if "trace" in needs and PLAN.kind(study).traced:
        inputs["trace"] = [run_file(study, r.name, "trace") for r in runs]
    return inputs


def cache_runs(wildcards):
    return [r.name for r in PLAN.runs[wildcards.study]]


# -- figures ----------------------------------------------------------------------------------
def figure_spec(wildcards):
    return FIGURES[wildcards.figure][1]


def figure_study(wildcards):
    return FIGURES[wildcards.figure][0]


def figure_inputs(wildcards):
    study, spec = FIGURES[wildcards.figure]
    if "table" in spec:
        return {"table": PLAN.table(study, spec["table"])}
    metric = spec.get("metric", "performance")
    return {
        "table": f"results/{study}/cache/{metric}.parquet",
        "summary": f"results/{study}/cache/{metric}.summary.parquet",
    }


def run_dirs(study):
    """``run name -> run directory`` of every run of a study."""
    return {r.name: run_dir(study, r.name) for r in PLAN.runs[study]}


# -- teleportation: the runs of the grid, the two interpolated runs --------------------------------
def grid_inputs(wildcards):
    dirs = run_dirs(wildcards.study).values()
    return [f"{d}/{RUN_FILES[f]}" for d in dirs for f in ("summary", "history")]


def interpolation_inputs(wildcards):
    dirs = list(run_dirs(wildcards.study).values())[:2]
    return [f"{d}/{RUN_FILES['final']}" for d in dirs]


# -- modelsym: pairs and zoo jobs (planned by pipeline.modelsym.study.ModelsymStudy) -----------
from pipeline.modelsym import study as zoo_study  # noqa: E402


def pair_files(part, keys):
    """The member/feature files of every sampled pair of ``part`` (``keys`` of each entry)."""

    def inputs(wildcards):
        entries = PLAN.kind(wildcards.study).pair_entries(part)
        return sorted({e[k] for e in entries for k in keys})

    return inputs


def zoo_code(study, zoo):
    """A vectorised zoo job's ``code`` param (its training: see :func:`tracks_code`)."""

    def param(wildcards):
        value = fingerprint("zoo_train.py", zoo_study.zoo_hparams(PLAN.study(study), zoo))
        return value if tracks_code(study) else Untracked(value)

    return per_job(param)


def zoo_summary_code(study, zoo):
    """What a vectorised zoo job's ``summary.json`` records as ``code`` (see pipeline.stale),
    computed here rather than in the job; Untracked, as ``code`` re-runs the job."""
    config = zoo_study.zoo_hparams(PLAN.study(study), zoo)
    return per_job(lambda wildcards: Untracked(code_fingerprint(zoo_study.ZOO_CODE, config)))


def stitching_type(wildcards):
    return PLAN.study(wildcards.study)["stitching"]["types"][wildcards.stitch]["type"]


# -- recovery (Expand-and-Cluster) and lottery levels (RecoveryStudy, PrunePart plan them) -----
def problem(wildcards):
    """The problem's teacher, probe, expand and cluster settings (``recovery.plan.problems``)."""
    return PLAN.kind(wildcards.study).problems_planned[wildcards.problem]


def resolved_teacher(wildcards):
    """The problem's teacher, a trained run's directory for ``kind: run``."""
    teacher = dict(problem(wildcards)["teacher"])
    if teacher.get("kind") == "run":
        return {"kind": "run", "run_dir": run_dir(teacher["study"], teacher["run"])}
    return teacher


def teacher_inputs(wildcards):
    teacher = resolved_teacher(wildcards)
    if teacher.get("kind") != "run":
        return []
    return [f"{teacher['run_dir']}/{RUN_FILES[f]}" for f in ("final", "hparams")]


def lottery_inputs(wildcards):
    """Every level table of the study's lottery (per problem or run, and strategy)."""
    return [path for path, _ in PLAN.planner(wildcards.study, "lottery").lottery_inputs()]


def lottery_labels(wildcards):
    """Per input of :func:`lottery_inputs`, the columns that say whose levels it holds."""
    return [labels for _, labels in PLAN.planner(wildcards.study, "lottery").lottery_inputs()]


def lottery_settings(wildcards):
    block = dict(PLAN.planner(wildcards.study, "lottery").lottery_block())
    block.pop("strategies", None)
    return {**block, "strategy": wildcards.strategy}


# -- masks -------------------------------------------------------------------------------------
def masks_spec(wildcards):
    return PLAN.study(wildcards.study)["masks"]


def masks_tables_inputs(wildcards):
    return [f"results/{wildcards.study}/masks/{r.name}/tables" for r in PLAN.runs[wildcards.study]]


# -- claims: the registered claims whose tables a study has, what they know of its runs --------
from pipeline.claims import register_claim  # noqa: E402


def study_claims(study):
    """The registered claims whose tables the study has."""
    keys = PLAN.claim_tables(study)
    return [
        name
        for name, entry in register_claim.entries().items()
        if all(t in keys for t in entry.meta.get("tables", ()))
    ]


def claim_runs(wildcards):
    """What the claims know of each run: its non-default hyperparameters (the claims job
    resolves the defaults, so adding a hyperparameter with a default re-checks nothing)."""
    return {r.name: r.nondefault for r in PLAN.runs[wildcards.study]}


# -- SLURM: the site's settings (profiles/slurm/site.yaml) on every rule; jobs that cannot fit ----
from pipeline import cluster  # noqa: E402

try:
    SITE = cluster.read_site(os.path.join(workflow.basedir, "profiles", "slurm", "site.yaml"))
except cluster.SiteError as err:
    raise WorkflowError(str(err)) from None
cluster.honour_no_account()


def site_resources(gpus=None):
    """Every rule's ``resources:`` end with ``**site_resources()`` (``gpus=`` where GPUs may be used)."""
    return cluster.job_resources(SITE, gpus)


def gpus_of(study):
    return PLAN.study(study).get("resources", {}).get("gpus", 1 if DEVICE == "cuda" else 0)


def study_gpus(wildcards):
    return gpus_of(wildcards.study)


onstart:
    if workflow.executor_plugin is not None and workflow.executor_plugin.name == "slurm":
        dag = workflow.dag
        try:
            cluster.check_schedulable(
                j for j in dag.get_jobs_or_groups() if j.is_group() or dag.needrun(j)
            )
        except cluster.SiteError as err:
            raise WorkflowError(str(err)) from None


def package_versions():
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("torch", "numpy", "scipy", "pandas", "h5py", "matplotlib", "snakemake"):
        try:
            out.append(f"{pkg} {version(pkg)}")
        except PackageNotFoundError:
            pass
    return ", ".join(out)


VERSIONS = package_versions()
