"""The supervisor stops every process it started, detached grandchildren included, by pid."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

from simulations.deploy.supervisor import Supervisor
from tests.e2e.test_deployment import still_running


def test_supervisor_stops_detached_grandchildren_by_pid(tmp_path: Path) -> None:
    # A parent that starts a grandchild in a new session (as Flower starts SuperExec) and keeps running.
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    supervisor = Supervisor(tmp_path / "logs", env={}, cwd=tmp_path)
    argv = [sys.executable, "-c", script]
    parent = supervisor.start("parent", argv, env={"PATH": "/usr/bin:/bin"})
    assert supervisor.commands["parent"] == argv
    log = tmp_path / "logs" / "parent.log"
    deadline = time.monotonic() + 20
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    grandchild_pid = int(log.read_text().split()[0])
    supervisor.refresh()
    tracked = {p.pid for p in supervisor.seen}
    assert {parent.pid, grandchild_pid} <= tracked
    try:
        assert supervisor.stop_all(grace_s=5) == []
        assert [p.pid for p in supervisor.seen if still_running(p)] == []
        assert parent.returncode is not None
    finally:
        for proc in supervisor.seen:  # never leave a sleeper behind, even when an assertion failed
            if still_running(proc):
                os.kill(proc.pid, signal.SIGKILL)
