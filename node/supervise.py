"""Supervised child processes: the skeleton the receiver pool (node.receivers) and the analysis
worker pool (node.workers) share.

``n`` processes (multiprocessing *spawn*: fresh interpreters, no inherited database connections)
are started; a supervisor thread looks every 2 s for one that has died and starts it again (at
once the first time, then after 4, 8, ... up to 60 s for a process that keeps dying); ``stop``
sends SIGTERM to all of them, waits for them together at most ``stop_timeout_s`` and SIGKILLs
those still running. What a child runs, what is said when one dies and what is done after the
stop are the subclass's.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time

SUPERVISE_INTERVAL_S = 2.0


def restart_delay_s(restarts: int) -> float:
    """Seconds to wait before the ``restarts``-th restart of one child: none for the first, then
    doubling (4, 8, 16, ...) up to 60 s."""
    return min(60.0, 2.0 ** min(restarts, 6)) if restarts > 1 else 0


class SupervisedPool:
    """``n`` supervised child processes: started, restarted when one dies, stopped.

    Subclasses define ``_spawn(i)`` (start child ``i`` with ``_start_child``) and ``_exited(i, p)``
    (what is said and done when child ``i``, process ``p``, has died, before it is started again);
    they may override ``_restart(i)`` (default: ``_spawn(i)``) and ``_stopped(procs)`` (after the
    stop timeout; default: kill those still running)."""

    supervisor_name = "pool"  # the supervisor thread's name
    kill_wait_s: float | None = None  # how long to wait for a child after SIGKILL (None: until it ends)

    def __init__(self, settings, n: int, *, stop_timeout_s: float) -> None:
        self.settings = settings
        self.n = n
        self.stop_timeout_s = stop_timeout_s
        self._ctx = mp.get_context("spawn")
        self._procs: list = [None] * n
        self._stopping = threading.Event()
        self._supervisor: threading.Thread | None = None

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs if p is not None and p.pid is not None]

    def _start_child(self, i: int, target, name: str, args: tuple):
        """Start ``target(*args)`` in a new process named ``name`` as child ``i``."""
        p = self._ctx.Process(target=target, name=name, args=args)
        p.start()
        self._procs[i] = p
        return p

    def _spawn(self, i: int):
        raise NotImplementedError

    def _exited(self, i: int, p) -> None:
        raise NotImplementedError

    def _restart(self, i: int) -> None:
        self._spawn(i)

    def _start_supervisor(self) -> None:
        self._supervisor = threading.Thread(target=self._supervise, name=self.supervisor_name, daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        restarts = [0] * self.n
        while not self._stopping.wait(SUPERVISE_INTERVAL_S):
            for i, p in enumerate(self._procs):
                if p is None or p.is_alive() or self._stopping.is_set():
                    continue
                restarts[i] += 1
                self._exited(i, p)
                time.sleep(restart_delay_s(restarts[i]))
                if not self._stopping.is_set():
                    self._restart(i)

    def stop(self) -> None:
        """SIGTERM to every child; those still running after ``stop_timeout_s`` (one deadline for
        all) are killed (``_stopped``)."""
        self._stopping.set()
        for p in self._procs:
            if p is not None and p.is_alive():
                p.terminate()
        deadline = time.monotonic() + self.stop_timeout_s
        for p in self._procs:
            if p is not None:
                p.join(max(0.0, deadline - time.monotonic()))
        self._stopped([p for p in self._procs if p is not None])

    def _stopped(self, procs: list) -> None:
        for p in procs:
            self._kill(p)

    def _kill(self, p) -> None:
        """SIGKILL to child process ``p`` if it still runs, and wait for it (``kill_wait_s``)."""
        if p.is_alive():
            p.kill()
            p.join(self.kill_wait_s)
