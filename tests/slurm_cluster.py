"""Start and stop a real single-node SLURM cluster (munge, slurmctld, slurmd) on this machine.

Installs Debian's packages when they are missing (needs root and the Debian mirror), writes a
minimal slurm.conf (accounting off; one node of at most 2 CPUs and 12 GB, smaller than what the
old grouped jobs asked for), starts the daemons that are not running, and remembers their PIDs,
so :func:`stop` stops exactly those. It also puts slurm.conf back as it found it: with the
client tools installed but no controller reachable, every ``snakemake`` start (the SLURM plugin
probes the cluster) would wait about 9 s; without a slurm.conf the probe fails at once.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
CONF = Path("/etc/slurm/slurm.conf")
PIDFILES = {
    "munged": Path("/run/munge/munged.pid"),
    "slurmctld": Path("/run/slurmctld.pid"),
    "slurmd": Path("/run/slurmd.pid"),
}
NODE_CPUS, NODE_MEM_MB = 2, 12000


@dataclass
class Cluster:
    started: list[tuple[str, int]] = field(default_factory=list)  # (daemon, pid), in start order
    conf_before: str | None = None  # slurm.conf as found (None: there was none)
    cpus: int = NODE_CPUS
    mem_mb: int = NODE_MEM_MB


def _run(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, **kw)


def install() -> None:
    if all(shutil.which(b) for b in ("slurmctld", "slurmd", "sbatch", "munged")):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    _run("apt-get", "update", "-qq", env=env)
    _run("apt-get", "install", "-y", "-qq", *PACKAGES, env=env)


def _config(cpus: int, mem_mb: int) -> str:
    host = socket.gethostname()
    return f"""ClusterName=local
SlurmctldHost={host}
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SlurmctldPidFile={PIDFILES["slurmctld"]}
SlurmdPidFile={PIDFILES["slurmd"]}
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


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (not gone, not a zombie)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(") ", 1)[1][:1]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _pid(daemon: str, timeout: float = 10) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            return int(PIDFILES[daemon].read_text().split()[0])
        except (OSError, ValueError, IndexError):
            time.sleep(0.1)
    raise RuntimeError(f"{daemon} wrote no PID file {PIDFILES[daemon]}")


def start(timeout: float = 60) -> Cluster:
    """Start whichever daemons are not running; return what was started and the old slurm.conf."""
    install()
    total_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    cluster = Cluster(
        conf_before=CONF.read_text() if CONF.exists() else None,
        cpus=min(NODE_CPUS, os.cpu_count() or 1),
        mem_mb=min(NODE_MEM_MB, int(total_mb * 0.8)),
    )
    for d in ("/var/spool/slurmctld", "/var/spool/slurmd", "/var/log/slurm", "/run/munge"):
        Path(d).mkdir(parents=True, exist_ok=True)
    CONF.parent.mkdir(parents=True, exist_ok=True)
    CONF.write_text(_config(cluster.cpus, cluster.mem_mb))
    try:
        if not _running("munged"):
            PIDFILES["munged"].unlink(missing_ok=True)
            _run("chown", "-R", "munge:munge", "/etc/munge", "/run/munge")
            _run("su", "-s", "/bin/sh", "munge", "-c", "/usr/sbin/munged")
            cluster.started.append(("munged", _pid("munged")))
        for daemon, args in (("slurmctld", ("-c",)), ("slurmd", ())):
            if not _running(daemon):
                PIDFILES[daemon].unlink(missing_ok=True)
                _run(daemon, *args)
                cluster.started.append((daemon, _pid(daemon)))
        deadline = time.time() + timeout
        state = ""
        while time.time() < deadline:
            state = _run("sinfo", "-h", "-o", "%T", check=False).stdout.strip()
            if state in ("idle", "mixed", "allocated"):
                return cluster
            time.sleep(1)
        raise RuntimeError(f"the SLURM node did not come up (sinfo: {state!r})")
    except BaseException:
        stop(cluster)
        raise


def stop(cluster: Cluster) -> None:
    """Cancel the test's jobs, stop the daemons ``start`` started (by PID, newest first), then
    restore slurm.conf."""
    if cluster.started:
        jobs = _run("squeue", "-h", "-o", "%i", check=False).stdout.split()
        if jobs:
            _run("scancel", "--full", *jobs, check=False)
        deadline = time.time() + 60
        while time.time() < deadline and _run("squeue", "-h", check=False).stdout.strip():
            time.sleep(0.5)
    for _, pid in reversed(cluster.started):
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 30
        while time.time() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)
    if cluster.conf_before is None:
        CONF.unlink(missing_ok=True)
    else:
        CONF.write_text(cluster.conf_before)
