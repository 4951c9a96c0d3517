"""node.supervise.SupervisedPool (the skeleton of the receiver and worker pools): a child that dies
is reported and started again; stop sends SIGTERM to every child and SIGKILLs those still running
after stop_timeout_s; the restart back-off."""

from __future__ import annotations

import signal
import time
from pathlib import Path

from node.supervise import SupervisedPool, restart_delay_s
from tests.helpers import wait_until


def _child(folder: str, i: int) -> None:
    """Child 0 ignores SIGTERM; child 1 exits with code 3 the first time it runs. Each writes
    ``started-<i>-<n>`` once its signal handling is set."""
    folder_p = Path(folder)
    if i == 0:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    n = len(list(folder_p.glob(f"started-{i}-*")))
    (folder_p / f"started-{i}-{n}").touch()
    if i == 1 and n == 0:
        raise SystemExit(3)
    while True:
        time.sleep(0.1)


class _Pool(SupervisedPool):
    supervisor_name = "test-pool"

    def __init__(self, folder: Path) -> None:
        super().__init__(None, 2, stop_timeout_s=0.5)
        self.folder = folder
        self.exited: list[tuple[int, int | None]] = []

    def _spawn(self, i: int) -> None:
        self._start_child(i, _child, f"test-child-{i}", (str(self.folder), i))

    def start(self) -> None:
        for i in range(self.n):
            self._spawn(i)
        self._start_supervisor()

    def _exited(self, i: int, p) -> None:
        self.exited.append((i, p.exitcode))


def test_dead_child_restarted_and_stop_kills_one_ignoring_sigterm(tmp_path):
    pool = _Pool(tmp_path)
    pool.start()
    try:
        first = pool.pids
        assert len(first) == 2
        wait_until(lambda: (tmp_path / "started-1-1").exists(), timeout=30, what="child 1 started again")
        wait_until(lambda: (tmp_path / "started-0-0").exists(), timeout=30, what="child 0 ignoring SIGTERM")
        assert pool.exited == [(1, 3)]
        assert pool.pids[0] == first[0] and pool.pids[1] != first[1]
        assert pool._supervisor.name == "test-pool" and pool._supervisor.is_alive()
    finally:
        procs = list(pool._procs)
        pool.stop()
    assert [p.exitcode for p in procs] == [-signal.SIGKILL, -signal.SIGTERM]
    assert not any(p.is_alive() for p in procs)
    assert pool.exited == [(1, 3)]  # a child ended by stop is not restarted
    assert sorted(f.name for f in tmp_path.iterdir()) == ["started-0-0", "started-1-0", "started-1-1"]


def test_restart_back_off():
    assert [restart_delay_s(k) for k in range(1, 9)] == [0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0, 60.0]
