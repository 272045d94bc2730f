"""Running the workflow on a SLURM cluster: the site's settings, and a check that every job fits.

Site settings (``profiles/slurm/site.yaml``) are what a cluster's sbatch lines need, by kind of
job, as the Snakemake resources the SLURM executor plugin reads::

    every_job: {slurm_account: myproject}             # all jobs
    cpu_jobs: {slurm_partition: cpu}                  # jobs that ask for no GPU
    gpu_jobs: {slurm_partition: gpu, gpu_model: a100} # jobs that ask for GPUs (device: cuda)

Every rule takes them through :func:`job_resources`, whatever its (generated) name, so a site
sets them once. Empty sections add nothing: SLURM's default partition and the user's default
account. Job sizes (``runtime``, ``mem_mb``, ``gpus``, ``threads``) stay with each study's
``resources:`` block in the config.
"""

from __future__ import annotations

import shlex
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

SECTIONS = ("every_job", "cpu_jobs", "gpu_jobs")
#: resources a site may set: where a job runs and who pays, never how big it is
KEYS = ("slurm_partition", "slurm_account", "gpu_model", "constraint", "qos", "slurm_cluster")


class SiteError(ValueError):
    """The site settings file is malformed."""


def read_site(path: str | Path) -> dict[str, dict]:
    """The site settings in ``path`` (all sections empty if the file does not exist)."""
    import yaml

    path = Path(path)
    site = {s: {} for s in SECTIONS}
    if not path.is_file():
        return site
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise SiteError(f"{path}: not valid YAML ({err})") from None
    if not isinstance(data, dict):
        raise SiteError(f"{path}: expected a mapping with sections {list(SECTIONS)}")
    for section, values in data.items():
        if section not in SECTIONS:
            raise SiteError(f"{path}: unknown section {section!r}; allowed: {list(SECTIONS)}")
        values = values or {}
        if not isinstance(values, dict):
            raise SiteError(f"{path}: {section} must be a mapping of resources")
        for key, value in values.items():
            if key not in KEYS:
                raise SiteError(
                    f"{path}: {section}.{key} is not a site setting; allowed: {list(KEYS)} "
                    "(job sizes go in each study's resources: block of the config)"
                )
            if not isinstance(value, str | int) or isinstance(value, bool):
                raise SiteError(f"{path}: {section}.{key} must be a string or a number")
        site[section] = {k: v for k, v in values.items() if v != ""}
    return site


def job_resources(site: dict[str, dict], gpus: int | Callable | None = None) -> dict:
    """A rule's site resources: ``every_job``, then ``gpu_jobs`` or ``cpu_jobs``.

    ``gpus``: the rule's GPU count, a number or a function of the wildcards (``None``: a rule
    that never uses a GPU, no ``gpu`` resource). The GPU section applies to the jobs whose count
    is positive; the result includes ``gpu`` itself when ``gpus`` is given.
    """

    def pick(n_gpus: int) -> dict:
        return {**site["every_job"], **site["gpu_jobs" if n_gpus > 0 else "cpu_jobs"]}

    if not callable(gpus):
        out = pick(gpus or 0)
        return out if gpus is None else {**out, "gpu": gpus}
    keys = {k for section in SECTIONS for k in site[section]}
    return {"gpu": gpus, **{key: _per_job(pick, gpus, key) for key in sorted(keys)}}


def _per_job(pick, gpus, key):
    def value(wildcards):
        return pick(gpus(wildcards)).get(key)  # None: the resource is not set for this job

    return value


# -- does every job fit the cluster? -------------------------------------------------------------
def sbatch_test_args(request: dict) -> list[str]:
    """``sbatch --test-only`` arguments for one job's request (the shape the plugin submits)."""
    args = ["sbatch", "--test-only", "--ntasks=1", f"--cpus-per-task={request['cpus']}"]
    flags = {
        "slurm_partition": "--partition",
        "slurm_account": "--account",
        "constraint": "--constraint",
        "qos": "--qos",
        "slurm_cluster": "--clusters",
    }
    args += [f"{flag}={request[key]}" for key, flag in flags.items() if request.get(key)]
    if request.get("mem_mb"):
        args.append(f"--mem={request['mem_mb']}")
    if request.get("runtime"):
        args.append(f"--time={request['runtime']}")
    gpus = request.get("gpu") or 0
    if request.get("gpu_model"):
        args.append(f"--gpus={request['gpu_model']}:{gpus or 1}")
    elif gpus:
        args.append(f"--gpus={gpus}")
    return [*args, "--wrap=true"]


def unschedulable(requests: Iterable[tuple[str, dict]], run=subprocess.run) -> list[str]:
    """Ask SLURM (``sbatch --test-only``) whether each distinct request can ever run.

    ``requests``: ``(job name, request)`` pairs, a request holding ``cpus``, ``mem_mb``,
    ``runtime`` (minutes), ``gpu`` and any site keys. Returns one line per request SLURM
    refuses, naming the jobs, what they ask for and SLURM's reason.
    """
    jobs: dict[tuple, list[str]] = {}
    for name, request in requests:
        key = tuple(sorted((k, v) for k, v in request.items() if v not in (None, "", 0)))
        jobs.setdefault(key, []).append(name)
    problems = []
    for key, names in jobs.items():
        args = sbatch_test_args(dict(key))
        proc = run(args, capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            reason = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
            shown = ", ".join(sorted(set(names))[:3]) + (" ..." if len(set(names)) > 3 else "")
            problems.append(f"{shown}: {shlex.join(args[2:-1])}: {reason}")
    return problems


def check_schedulable(jobs, run=subprocess.run) -> None:
    """Raise ``SiteError`` if SLURM can never run one of ``jobs`` (Snakemake jobs or groups).

    Without this, a job asking for more CPUs than its partition has pends forever
    (``Reason=PartitionConfig``) and the workflow waits with it.
    """
    requests = []
    for job in jobs:
        res = job.resources
        request = {k: res.get(k) for k in (*KEYS, "mem_mb", "runtime", "gpu")}
        request["cpus"] = res.get("cpus_per_task") or job.threads
        requests.append((job.name, request))
    problems = unschedulable(requests, run=run)
    if problems:
        raise SiteError(
            "SLURM cannot run these jobs on this cluster (sbatch --test-only refused them), so "
            "they would wait forever; lower the request in the study's resources: block or "
            "choose another partition in profiles/slurm/site.yaml:\n  " + "\n  ".join(problems)
        )


# -- snakemake-executor-plugin-slurm 2.8.0 -------------------------------------------------------
def honour_no_account() -> None:
    """Make ``--slurm-no-account`` submit without ``-A`` instead of guessing one.

    The plugin (2.8.0) defines the setting but never reads it: a job without ``slurm_account``
    makes it call ``sacct`` to guess an account and warn (and on a cluster without accounting,
    warn again). With the setting on and no account given, this submits without ``-A``, so SLURM
    uses the user's default account. Jobs with ``slurm_account`` are unchanged.
    """
    try:
        from snakemake_executor_plugin_slurm import Executor
    except ImportError:
        return
    original = Executor.get_account_arg
    if getattr(original, "honours_no_account", False):
        return

    def get_account_arg(self, job):
        settings = self.workflow.executor_settings
        if getattr(settings, "no_account", False) and not job.resources.get("slurm_account"):
            yield ""
            return
        yield from original(self, job)

    get_account_arg.honours_no_account = True
    Executor.get_account_arg = get_account_arg
