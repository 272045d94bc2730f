"""Stop requests: a training job asked to stop writes its resume state and exits.

Clusters stop jobs: ``sbatch --signal=TERM@120`` (set by ``profiles/slurm``) sends SIGTERM to a
job's steps two minutes before its time limit, and SLURM sends SIGTERM at the limit and on
preemption (then SIGKILL after ``KillWait``, 30 s by default). A training loop runs with a
:class:`StopRequest` installed: the handler only records the signal, the loop checks ``if stop:``
at its step boundaries, writes a resume checkpoint and raises :meth:`StopRequest.error`. The job
then fails with a one-line message, and Snakemake's retry (``retries:`` in the profile) or
SLURM's requeue runs it again, which resumes from that checkpoint. Before ``install`` and after
``restore``, and in threads other than the main one (where Python cannot install handlers),
signals keep their previous behaviour.
"""

from __future__ import annotations

import signal
import threading

#: SIGTERM: preemption, time limit, ``scancel``, ``kill``; SIGUSR1: sites that signal with it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class TrainingStopped(RuntimeError):
    """Training stopped on request after writing its resume state; running it again resumes."""


class StopRequest:
    """Context manager that turns the stop signals into a flag: ``bool(stop)`` once one came.

    ``signum`` is the first signal received (``None`` before). Previous handlers are restored on
    exit, so nested or consecutive loops (several runs in one job) each get a fresh request.
    """

    def __init__(self, signals: tuple[int, ...] = STOP_SIGNALS):
        self.signals = signals
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is None:
            self.signum = signum

    def install(self) -> StopRequest:
        """Catch the stop signals from now on (in the main thread; elsewhere a no-op)."""
        if threading.current_thread() is threading.main_thread():
            for s in self.signals:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        """Give the stop signals back their previous handlers."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()

    def __bool__(self) -> bool:
        return self.signum is not None

    def error(self, where: str, resumable: bool = True) -> TrainingStopped:
        """The exception a loop raises after saving: names the signal and what was written
        (``resumable``: a re-run resumes from a saved state; else it starts over)."""
        name = signal.Signals(self.signum).name if self.signum is not None else "request"
        again = "resume from there" if resumable else "start it over (it keeps no resume state)"
        return TrainingStopped(
            f"stopped by {name} {where}; run the job again to {again} (Snakemake's retries do so)"
        )
