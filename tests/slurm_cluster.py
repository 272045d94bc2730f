"""Start and stop a real single-node SLURM cluster (munge, slurmctld, slurmd) on this machine.

Installs Debian's packages when they are missing (needs root and the Debian mirror), writes a
minimal slurm.conf (accounting off), starts the daemons and remembers which it started, so
:func:`stop` stops exactly those.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
CONF = Path("/etc/slurm/slurm.conf")


def _run(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def install() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run("apt-get", "update", "-qq", env=env)
    _run("apt-get", "install", "-y", "-qq", *PACKAGES, env=env)


def _config() -> str:
    host = socket.gethostname()
    cpus = os.cpu_count() or 1
    mem_mb = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8)
    return f"""ClusterName=local
SlurmctldHost={host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
NodeName={host} CPUs={cpus} RealMemory={mem_mb} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


def _running(name: str) -> bool:
    return _run("pgrep", "-x", name, check=False).returncode == 0


def start(timeout: float = 60) -> list[str]:
    """Start whichever daemons are not running; return the names of those started."""
    install()
    for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm", "/run/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
    if not CONF.exists() or "ClusterName=local" not in CONF.read_text():
        CONF.parent.mkdir(parents=True, exist_ok=True)
        CONF.write_text(_config())
    started = []
    if not _running("munged"):
        _run("chown", "-R", "munge:munge", "/etc/munge", "/run/munge")
        _run("su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged")
        started.append("munged")
    for daemon in ("slurmctld", "slurmd"):
        if not _running(daemon):
            _run(daemon)
            started.append(daemon)
    deadline = time.time() + timeout
    while time.time() < deadline:
        state = _run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
        if state in ("idle", "mixed", "allocated"):
            return started
        time.sleep(1)
    stop(started)
    raise RuntimeError(f"the SLURM node did not come up (sinfo: {state!r})")


def stop(started: list[str]) -> None:
    """Stop the daemons this module started, newest first, and wait until they are gone."""
    for daemon in reversed(started):
        _run("pkill", "-x", daemon, check=False)
    deadline = time.time() + 30
    while time.time() < deadline and any(_running(d) for d in started):
        time.sleep(0.5)
