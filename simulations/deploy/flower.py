"""Flower plumbing for loopback runs: ports, executables, environment, the staged app, config files, queries.

`flwr run` builds the app bundle from a folder and, in Flower 1.42, rewrites a pyproject.toml that still
has a `[tool.flwr.federations]` table (it moves those entries into FLWR_HOME/config.toml). So the app is
staged into the run directory first, with Flower's own file selection, and the project is never touched.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
import zipfile
from pathlib import Path
from typing import Any

import tomli_w

from simulations.deploy.supervisor import (
    ProcessId,
    Supervisor,
    parent_pid,
    processes_with_argument,
)

LOOPBACK = "127.0.0.1"
CONNECTION = "fedecg-loopback"  # the SuperLink connection written into the flwr CLI's config.toml
LOCAL_SIMULATION = "local-simulation"  # a local-simulation connection written into FLWR_HOME/config.toml


class DeploymentError(RuntimeError):
    """A loopback deployment that did not start, did not finish, failed, or left its outputs incomplete."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.processes: dict[ProcessId, str] = {}  # what was started, all stopped before this was raised


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on the loopback interface right now."""
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((LOOPBACK, 0))
            sockets.append(sock)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for sock in sockets:
            sock.close()


def flower_executable(name: str) -> str:
    """A Flower console script from this interpreter's environment (Flower starts its sub-commands by name too)."""
    candidate = Path(sys.executable).parent / name
    if candidate.is_file():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise DeploymentError(f"`{name}` not found next to {sys.executable} nor on PATH; install flwr in this environment")
    return found


def process_environment(flwr_home: Path, ray_tmp: Path | None = None) -> dict[str, str]:
    """Offline, quiet Flower with its home in the run; Flower's own executables first on PATH."""
    from simulations.simulate import flower_environment

    env = dict(os.environ)
    env.update(flower_environment(flwr_home))
    if ray_tmp is not None:
        env["RAY_TMPDIR"] = str(ray_tmp)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _ignored_by_git(project: Path) -> Any:  # a pathspec.PathSpec
    import pathspec  # a Flower dependency

    lines = [".git/", ".venv/"]
    gitignore = project / ".gitignore"
    if gitignore.is_file():
        lines += gitignore.read_text().splitlines()
    return pathspec.PathSpec.from_lines("gitignore", lines)


def stage_app(project: Path, dest: Path) -> Path:
    """Copy into `dest` exactly the files Flower would bundle from `project`, and its pyproject.toml verbatim.

    Git-ignored folders (.venv, runs, caches) are skipped while walking, which saves the seconds Flower
    spends walking a virtual environment it then excludes anyway.
    """
    from flwr.cli.build import build_fab_from_files

    project = project.resolve()
    if not (project / "pyproject.toml").is_file():
        raise DeploymentError(f"{project}: no pyproject.toml, so not a Flower app folder")
    ignored = _ignored_by_git(project)
    files: dict[str, Path] = {}
    for dirpath, dirnames, filenames in os.walk(project):
        rel = Path(dirpath).relative_to(project)
        dirnames[:] = sorted(d for d in dirnames if not ignored.match_file(f"{(rel / d).as_posix()}/"))
        for name in filenames:
            path = Path(dirpath) / name
            if not path.is_symlink():
                files[(rel / name).as_posix()] = path
    fab, _ = build_fab_from_files(files)
    dest.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(io.BytesIO(fab)) as archive:
        for member in archive.namelist():
            if member.startswith(".info/") or member == "pyproject.toml":
                continue
            target = dest / member
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(archive.read(member))
    shutil.copyfile(project / "pyproject.toml", dest / "pyproject.toml")
    return dest


def write_toml_table(path: Path, values: dict[str, Any]) -> Path:
    """Flat key = value TOML, for `--run-config FILE.toml` and `--node-config FILE.toml` (any characters in paths)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(values))
    return path


def write_superlink_connection(flwr_home: Path, name: str, address: str, root_certificates: Path | None = None) -> Path:
    """The flwr CLI's connection to a SuperLink. Flower 1.42 keeps these in FLWR_HOME/config.toml, not pyproject.

    `address = ":local:"` is Flower's marker for "start a local simulation SuperLink when none answers".
    With `root_certificates` (the CA that signed the SuperLink's certificate) the CLI speaks TLS; without, it
    is told `insecure = true` explicitly.
    """
    connection: dict[str, Any] = {"address": address}
    if root_certificates is not None:
        connection["root-certificates"] = str(Path(root_certificates).resolve())
    elif address != ":local:":
        connection["insecure"] = True
    return write_toml_table(flwr_home / "config.toml", {"superlink": {"default": name, name: connection}})


def health_url(port: int, ca_cert: Path | None = None) -> tuple[str, ssl.SSLContext | None]:
    """The SuperLink's /health endpoint, over HTTPS verified against `ca_cert` when it serves TLS."""
    if ca_cert is None:
        return f"http://{LOOPBACK}:{port}/health", None
    return f"https://{LOOPBACK}:{port}/health", ssl.create_default_context(cafile=str(ca_cert))


def wait_for_health(port: int, supervisor: Supervisor, name: str, timeout_s: float, ca_cert: Path | None = None) -> None:
    """Poll /health until it answers 200; over TLS the server's certificate must verify against `ca_cert`."""
    url, context = health_url(port, ca_cert)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if supervisor.exited([name]):
            raise DeploymentError(f"{name} exited during start-up:\n{supervisor.log_tail(name)}")
        try:
            with urllib.request.urlopen(url, timeout=1.0, context=context) as response:
                if response.status == 200:
                    return
        except ssl.SSLCertVerificationError as err:  # retrying cannot help: wrong CA or a name not in the SAN
            raise DeploymentError(f"{name}: its TLS certificate does not verify against {ca_cert}: {err.verify_message}") from err
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    raise DeploymentError(f"{name} did not answer on {url} within {timeout_s:.0f}s:\n{supervisor.log_tail(name)}")


def flwr_json(
    supervisor: Supervisor, name: str, argv: list[str], deadline: float, env: dict[str, str] | None = None
) -> dict[str, Any]:
    """Run a `flwr ... --format json` command to its end and return its JSON answer.

    The flwr CLI exits 0 even when the SuperLink refused the request: only `success` in its answer tells.
    """
    popen = supervisor.start(name, [*argv, "--format", "json"], env)
    try:
        popen.wait(timeout=max(5.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as err:
        raise DeploymentError(f"`flwr {argv[1]}` did not answer in time:\n{supervisor.log_tail(name)}") from err
    text = (supervisor.log_dir / f"{name}.log").read_text(errors="replace")
    start = text.find("{")
    try:
        payload = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        payload = {}
    if not payload.get("success"):
        detail = payload.get("error-message") or supervisor.log_tail(name)
        raise DeploymentError(f"`flwr {' '.join(argv[1:])}` failed:\n{detail}")
    return payload


def run_status(
    supervisor: Supervisor, connection: str, flwr: str, deadline: float, env: dict[str, str] | None = None
) -> tuple[str, str]:
    """(status, details) of the one run on this SuperLink, from `flwr ls --format json`."""
    runs = flwr_json(supervisor, "flwr-ls", [flwr, "ls", connection], deadline, env).get("runs") or []
    if len(runs) != 1:
        raise DeploymentError(f"`flwr ls` did not list exactly one run:\n{supervisor.log_tail('flwr-ls')}")
    return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


def local_superlink(flwr_home: Path) -> list[ProcessId]:
    """The SuperLink `flwr run` starts for a local simulation: its command line names FLWR_HOME's log file.

    It is detached from the `flwr` process on purpose, so it is found this way and then stopped by pid.
    """
    found = processes_with_argument("--log-file", str(flwr_home / "local-superlink" / "superlink.log"))
    pids = {p.pid for p in found}
    # A child caught between fork and exec still shows its parent's command line: keep the topmost.
    return [p for p in found if parent_pid(p) not in pids]
