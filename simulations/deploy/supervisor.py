"""Long-running processes started in their own sessions, every descendant remembered, all stopped by pid.

Flower's processes spawn detached children (SuperExec, ServerApp, Ray), so descendants are recorded while
the run lasts: a grandchild whose parent has exited is no longer anyone's descendant.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil


@dataclass(frozen=True)
class ProcessId:
    """A process, told apart from a later one that reuses its pid by its creation time (psutil's identity)."""

    pid: int
    create_time: float


def _handle(proc: ProcessId) -> psutil.Process | None:
    """psutil's handle on this very process, or None when it is gone or its pid now belongs to another."""
    try:
        handle = psutil.Process(proc.pid)
        return handle if handle.create_time() == proc.create_time else None
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _identify(handle: psutil.Process) -> ProcessId | None:
    try:
        return ProcessId(handle.pid, handle.create_time())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def process_id(pid: int) -> ProcessId | None:
    try:
        return _identify(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return None


def is_running(proc: ProcessId) -> bool:
    """True while this very process exists and is not a zombie."""
    handle = _handle(proc)
    try:
        return handle is not None and handle.status() not in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return False


def parent_pid(proc: ProcessId) -> int | None:
    handle = _handle(proc)
    try:
        return None if handle is None else handle.ppid()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def descendants(root: ProcessId) -> list[ProcessId]:
    """Every live descendant of `root` (children of children included)."""
    handle = _handle(root)
    try:
        children = [] if handle is None else handle.children(recursive=True)
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return []
    return [proc for proc in map(_identify, children) if proc is not None]


def _command_lines() -> list[tuple[psutil.Process, list[str]]]:
    """(process, arguments) of every other process whose command line can be read."""
    own = os.getpid()
    return [
        (p, p.info["cmdline"])
        for p in psutil.process_iter(["cmdline"])
        if p.pid != own and p.info["cmdline"]  # None when access is denied, [] for kernel threads
    ]


def processes_with_argument(*needles: str) -> list[ProcessId]:
    """Live processes whose command line has all `needles` as consecutive arguments (exact matches)."""
    n = len(needles)
    found = (
        _identify(p)
        for p, words in _command_lines()
        if any(tuple(words[i : i + n]) == needles for i in range(len(words) - n + 1))
    )
    return [proc for proc in found if proc is not None]


def processes_mentioning(text: str) -> list[ProcessId]:
    """Live processes with `text` inside any argument (for unique paths, e.g. this run's Ray temp folder)."""
    found = (_identify(p) for p, words in _command_lines() if text in "\0".join(words))
    return [proc for proc in found if proc is not None]


def _signal(proc: ProcessId, sig: int, group: bool) -> None:
    if not is_running(proc):
        return
    try:
        if group and os.getpgid(proc.pid) == proc.pid:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


@dataclass
class Supervisor:
    """Starts long-running processes in their own sessions, remembers every descendant it sees, stops all by pid."""

    log_dir: Path
    env: dict[str, str]
    cwd: Path
    roots: dict[str, ProcessId] = field(default_factory=dict)  # name -> process started or adopted here
    popens: dict[str, subprocess.Popen] = field(default_factory=dict)
    seen: dict[ProcessId, str] = field(default_factory=dict)  # every process ever tracked -> owner name
    commands: dict[str, list[str]] = field(default_factory=dict)  # name -> the argv it was started with

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `argv` with its output in LOG_DIR/NAME.log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "wb") as log:
            popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env or self.env, cwd=self.cwd, start_new_session=True,  # own group: killpg reaches its children
            )
        proc = process_id(popen.pid) or ProcessId(popen.pid, 0.0)  # unreaped, so normally found even if it died
        self.roots[name] = proc
        self.popens[name] = popen
        self.commands[name] = list(argv)
        self.seen[proc] = name
        return popen

    def adopt(self, name: str, proc: ProcessId) -> None:
        """Take charge of a process someone else started (the SuperLink `flwr run` leaves behind)."""
        self.roots[name] = proc
        self.seen[proc] = name

    def refresh(self) -> None:
        """Record the current descendants: a detached grandchild loses its link to us once its parent exits."""
        for name, root in list(self.roots.items()):
            if is_running(root):
                for child in descendants(root):
                    self.seen.setdefault(child, name)

    def exited(self, names: Sequence[str]) -> list[tuple[str, int | None]]:
        """(name, exit code) of the named processes that are no longer running (code None: adopted, unknown)."""
        gone: list[tuple[str, int | None]] = []
        for name in names:
            if name in self.popens:
                if self.popens[name].poll() is not None:
                    gone.append((name, self.popens[name].returncode))
            elif name in self.roots and not is_running(self.roots[name]):
                gone.append((name, None))
        return gone

    def running(self) -> list[ProcessId]:
        return [p for p in self.seen if is_running(p)]

    def stop_all(self, grace_s: float = 10.0) -> list[ProcessId]:
        """SIGTERM everything tracked, SIGKILL what is left after `grace_s`; returns survivors (normally none)."""
        self.refresh()
        roots = set(self.roots.values())
        for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
            for proc in list(self.seen):
                _signal(proc, sig, group=proc in roots)
            deadline = time.monotonic() + wait_s
            while time.monotonic() < deadline:
                self._reap()
                if not self.running():
                    self._reap()  # a child that died since the last poll is a zombie until reaped
                    return []
                time.sleep(0.1)
        self._reap()
        return self.running()

    def _reap(self) -> None:
        """Collect our own children's exit status so they do not linger as zombies."""
        for popen in self.popens.values():
            popen.poll()

    def log_tail(self, name: str, lines: int = 40) -> str:
        path = self.log_dir / f"{name}.log"
        if not path.is_file():
            return ""
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(f"    {line}" for line in tail)
