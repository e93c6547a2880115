"""Run the fedecg Flower apps the way a deployment does, on one machine over loopback.

Two modes, both through Flower's own command line tools:

    # a SuperLink and one SuperNode per site, then `flwr run APP fedecg-loopback`
    python -m simulations.deploy_loopback --config configs/loopback.yaml --data-root ../shared/ptb-xl

    # `flwr run . local-simulation`: the SuperLink that `flwr run` starts itself, in simulation mode
    python -m simulations.deploy_loopback --local-simulation --config configs/loopback.yaml --data-root ../shared/ptb-xl

Every process started here, and every process those start, is stopped by process id at the end, also
when the run fails or times out. Flower's processes spawn detached children (SuperExec, ServerApp, Ray), so
descendants are tracked through /proc while the run lasts. The SuperLink that `flwr run` launches for a
local simulation is detached from the `flwr` process on purpose; it is found by its command line, which
names the log file inside this run's FLWR_HOME, and stopped the same way.

`flwr run` builds the app bundle from a folder and, in Flower 1.42, rewrites a pyproject.toml that still
has a `[tool.flwr.federations]` table (it moves those entries into FLWR_HOME/config.toml). So the app is
staged into the run directory first, with Flower's own file selection, and the project is never touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from common.config import Config, ConfigError, load

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LOOPBACK = "127.0.0.1"
CONNECTION = "fedecg-loopback"  # the SuperLink connection written into the flwr CLI's config.toml
LOCAL_SIMULATION = "local-simulation"  # a local-simulation connection written into FLWR_HOME/config.toml
PROC = Path("/proc")


class DeploymentError(RuntimeError):
    """A loopback deployment that did not start, did not finish, failed, or left its outputs incomplete."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.processes: dict[ProcessId, str] = {}  # what was started, all stopped before this was raised


# ----------------------------------------------------------------------------------------------------
# Processes: identities, descendants, stopping by pid


@dataclass(frozen=True)
class ProcessId:
    """A process, told apart from a later one that reuses its pid by its start time (clock ticks since boot)."""

    pid: int
    start_ticks: int


def _stat(pid: int) -> tuple[int, int, str] | None:
    """(parent pid, start ticks, state) from /proc/PID/stat, or None when the process is gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError, OSError):
        return None
    # The command name sits in parentheses and may hold spaces: the fields after the last ')' are fixed.
    fields = text[text.rindex(")") + 2 :].split()
    return int(fields[1]), int(fields[19]), fields[0]


def process_id(pid: int) -> ProcessId | None:
    stat = _stat(pid)
    return None if stat is None else ProcessId(pid, stat[1])


def is_running(proc: ProcessId) -> bool:
    """True while this very process exists and is not a zombie."""
    if proc.start_ticks < 0:  # no /proc (not Linux): the pid alone has to do
        try:
            os.kill(proc.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    stat = _stat(proc.pid)
    return stat is not None and stat[1] == proc.start_ticks and stat[2] not in ("Z", "X")


def _all_pids() -> list[int]:
    if not PROC.is_dir():
        return []
    return [int(p.name) for p in PROC.iterdir() if p.name.isdigit()]


def descendants(roots: Sequence[int]) -> list[ProcessId]:
    """Every live descendant of the given pids (children of children included)."""
    children: dict[int, list[ProcessId]] = {}
    for pid in _all_pids():
        stat = _stat(pid)
        if stat is not None:
            children.setdefault(stat[0], []).append(ProcessId(pid, stat[1]))
    found: list[ProcessId] = []
    stack = list(roots)
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child.pid)
    return found


def processes_with_argument(*needles: str) -> list[ProcessId]:
    """Live processes whose command line has all `needles` as consecutive arguments (exact matches)."""
    found = []
    own = os.getpid()
    for pid in _all_pids():
        if pid == own:
            continue
        try:
            args = (PROC / str(pid) / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        words = [a.decode(errors="replace") for a in args]
        n = len(needles)
        if any(tuple(words[i : i + n]) == needles for i in range(len(words) - n + 1)):
            proc = process_id(pid)
            if proc is not None:
                found.append(proc)
    return found


def processes_mentioning(text: str) -> list[ProcessId]:
    """Live processes with `text` inside any argument (for unique paths, e.g. this run's Ray temp folder)."""
    found = []
    own = os.getpid()
    for pid in _all_pids():
        if pid == own:
            continue
        try:
            cmdline = (PROC / str(pid) / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            proc = process_id(pid)
            if proc is not None:
                found.append(proc)
    return found


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

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
        """Start `argv` with its output in LOG_DIR/NAME.log."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with open(self.log_dir / f"{name}.log", "wb") as log:
            popen = subprocess.Popen(
                argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env or self.env, cwd=self.cwd, start_new_session=True,  # own group: killpg reaches its children
            )
        proc = process_id(popen.pid) or ProcessId(popen.pid, -1)
        self.roots[name] = proc
        self.popens[name] = popen
        self.seen[proc] = name
        return popen

    def adopt(self, name: str, proc: ProcessId) -> None:
        """Take charge of a process someone else started (the SuperLink `flwr run` leaves behind)."""
        self.roots[name] = proc
        self.seen[proc] = name

    def refresh(self) -> None:
        """Record the current descendants: a detached grandchild loses its link to us once its parent exits."""
        if not PROC.is_dir():
            return
        for name, root in list(self.roots.items()):
            if is_running(root):
                for child in descendants([root.pid]):
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


# ----------------------------------------------------------------------------------------------------
# Flower plumbing: ports, environment, app staging, CLI config


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


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # TOML basic strings take JSON's escapes
    raise TypeError(f"cannot write {value!r} as a TOML value")


def write_toml_table(path: Path, values: dict[str, Any]) -> Path:
    """Flat key = value TOML, for `--run-config FILE.toml` and `--node-config FILE.toml` (any characters in paths)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"{json.dumps(k)} = {_toml_value(v)}\n" for k, v in values.items()))
    return path


def write_superlink_connection(flwr_home: Path, name: str, address: str) -> Path:
    """The flwr CLI's connection to a SuperLink. Flower 1.42 keeps these in FLWR_HOME/config.toml, not pyproject.

    `address = ":local:"` is Flower's marker for "start a local simulation SuperLink when none answers".
    """
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    insecure = "" if address == ":local:" else "insecure = true\n"
    path.write_text(f'[superlink]\ndefault = "{name}"\n\n[superlink.{name}]\naddress = "{address}"\n{insecure}')
    return path


def wait_for_health(port: int, supervisor: Supervisor, name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if supervisor.exited([name]):
            raise DeploymentError(f"{name} exited during start-up:\n{supervisor.log_tail(name)}")
        try:
            with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/health", timeout=1.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.2)
    raise DeploymentError(f"{name} did not answer on {LOOPBACK}:{port}/health within {timeout_s:.0f}s:\n{supervisor.log_tail(name)}")


# ----------------------------------------------------------------------------------------------------
# Runs


@dataclass
class FlowerRunResult:
    run_dir: Path
    mode: str  # deployment | local-simulation
    status: str  # Flower's final run status, e.g. finished:completed
    seconds: float  # from the first process start to the end of the run (clean-up excluded)
    num_sites: int
    superlink: str  # host:port of the SuperLink's HTTP API (Control, Fleet, runtime), closed by now
    started: dict[str, ProcessId]  # name -> each process started (or, for the local SuperLink, adopted) here
    processes: dict[ProcessId, str]  # every process started or seen -> the name it was found under; all stopped
    log_dir: Path


def _resolved_inputs(
    config_path: str | Path, overrides: Sequence[str], data_root: str | Path | None
) -> tuple[Path, list[str], Config, Path]:
    """Absolute config path, overrides with absolute data/cache locations, the loaded config, the data root.

    Flower's app processes run in other working directories, so every path they read must be absolute.
    """
    from common.data.ptbxl import resolve_root

    config_path = Path(config_path).resolve()
    overrides = list(overrides)
    for text in overrides:
        if ";" in text:
            raise ConfigError(f"override {text!r}: ';' separates overrides in Flower's run config, so values cannot hold it")
    cfg = load(config_path, overrides)
    root = resolve_root(dataclasses.replace(cfg.data, root=str(data_root) if data_root else cfg.data.root))
    overrides.append(f"data.root={root}")
    for key, value in (("data.cache_dir", cfg.data.cache_dir), ("federation.site_state_dir", cfg.federation.site_state_dir)):
        path = Path(value).expanduser()
        if not path.is_absolute():
            overrides.append(f"{key}={path.resolve()}")
    return config_path, overrides, load(config_path, overrides), root


def _count_sites(cfg: Config) -> int:
    from common.data.partition import make_partition
    from common.data.ptbxl import load_metadata

    return len(make_partition(load_metadata(cfg.data), cfg.partition).sites)  # rest=merge adds one


def _prepare_run_dir(run_dir: str | Path | None, cfg: Config, mode: str) -> Path:
    from common.bundle import latest_checkpoint

    if run_dir is None:
        run_dir = Path(cfg.output.dir) / f"{cfg.output.name}-{mode}-{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(run_dir).resolve()
    if latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds a run; choose a new run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _rounds_done(run_dir: Path) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    try:
        return int(pointer.read_text().strip().rsplit("_", 1)[-1])
    except (OSError, ValueError):
        return 0


def _run_status(
    supervisor: Supervisor, connection: str, flwr: str, deadline: float, env: dict[str, str] | None = None
) -> tuple[str, str]:
    """(status, details) of the one run on this SuperLink, from `flwr ls --format json`."""
    name = "flwr-ls"
    popen = supervisor.start(name, [flwr, "ls", connection, "--format", "json"], env)
    try:
        popen.wait(timeout=max(5.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired as err:
        raise DeploymentError(f"`flwr ls` did not answer in time:\n{supervisor.log_tail(name)}") from err
    text = (supervisor.log_dir / f"{name}.log").read_text(errors="replace")
    start = text.find("{")
    try:
        payload = json.loads(text[start:]) if start >= 0 else {}
    except json.JSONDecodeError:
        payload = {}
    runs = payload.get("runs") or []
    if not payload.get("success") or len(runs) != 1:
        raise DeploymentError(f"`flwr ls` did not list exactly one run:\n{supervisor.log_tail(name)}")
    return str(runs[0].get("status", "")), str(runs[0].get("status-details", ""))


def _watch_run(
    supervisor: Supervisor, watched: Sequence[str], run_dir: Path, rounds: int, deadline: float, progress: bool,
    on_tick: Callable[[], None] | None = None,
) -> None:
    """Wait for `flwr run --stream` to return, failing early when a Flower process dies; tqdm over rounds."""
    from tqdm import tqdm

    stream = supervisor.popens["flwr-run"]
    with tqdm(total=rounds, desc="federated rounds", unit="round", disable=not progress) as bar:
        while stream.poll() is None:
            if on_tick is not None:
                on_tick()
            supervisor.refresh()
            died = supervisor.exited(watched)
            if died:
                name, code = died[0]
                raise DeploymentError(f"{name} exited with code {code} during the run:\n{supervisor.log_tail(name)}")
            if time.monotonic() > deadline:
                raise DeploymentError(
                    f"the run did not finish in time; the last log lines:\n{supervisor.log_tail('flwr-run')}"
                )
            done = min(_rounds_done(run_dir), rounds)
            if done > bar.n:
                bar.update(done - bar.n)
            time.sleep(0.5)
        bar.update(min(_rounds_done(run_dir), rounds) - bar.n)
    if stream.returncode != 0:
        raise DeploymentError(f"`flwr run` exited with code {stream.returncode}:\n{supervisor.log_tail('flwr-run')}")


def _check_outputs(run_dir: Path, cfg: Config) -> None:
    from common.bundle import latest_checkpoint

    if latest_checkpoint(run_dir) is None:
        raise DeploymentError(f"{run_dir}: the run finished but wrote no checkpoint")
    if cfg.privacy.enabled:
        certificate = run_dir / "privacy.json"
        if not certificate.is_file():
            raise DeploymentError(f"{run_dir}: DP was on but the run wrote no privacy.json")
        from common.privacy import verify_release

        problems = verify_release(run_dir)
        if problems:
            raise DeploymentError(f"{certificate}: the certificate does not verify: {'; '.join(problems)}")


def _finish(supervisor: Supervisor, error: BaseException | None) -> dict[ProcessId, str]:
    """Stop everything; a DeploymentError on its way out learns which processes there were."""
    survivors = supervisor.stop_all()
    processes = dict(supervisor.seen)
    if isinstance(error, DeploymentError):
        error.processes = processes
    if survivors and error is None:
        failure = DeploymentError(f"processes still running after SIGKILL: {[p.pid for p in survivors]}")
        failure.processes = processes
        raise failure
    return processes


def _stage_run(config_path, overrides, data_root, run_dir, project, label: str):
    """What both ways of running need: resolved inputs, the site count, a run dir, the staged app, its run config."""
    config_path, overrides, cfg, root = _resolved_inputs(config_path, overrides, data_root)
    num_sites = _count_sites(cfg)
    run_dir = _prepare_run_dir(run_dir, cfg, label)
    app = stage_app(Path(project), run_dir / ".flwr" / "app")
    run_config = write_toml_table(
        run_dir / ".flwr" / "run_config.toml",
        {"config-path": str(config_path), "overrides": ";".join(overrides), "run-dir": str(run_dir)},
    )
    return config_path, overrides, cfg, root, num_sites, run_dir, app, run_config


def run_loopback_deployment(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    data_root: str | Path | None = None,
    run_dir: str | Path | None = None,
    project: str | Path = PROJECT_ROOT,
    timeout_s: float = 600.0,
    progress: bool = True,
) -> FlowerRunResult:
    """SuperLink + one SuperNode per site on 127.0.0.1, `flwr run` of the fedecg app, then everything stopped.

    Each SuperNode gets node_config `site` (its index), `data-root` and `state-dir`. Raises DeploymentError
    (after stopping every process) if a process dies, the run fails or times out, or outputs are missing.
    """
    config_path, overrides, cfg, root, num_sites, run_dir, app, run_config = _stage_run(
        config_path, overrides, data_root, run_dir, project, "loopback"
    )
    flwr_homes = run_dir / ".flwr"
    link_port, *node_ports = free_ports(1 + num_sites)
    cli_home = flwr_homes / "cli"  # each Flower process has its own FLWR_HOME: FAB installs never race
    write_superlink_connection(cli_home, CONNECTION, f"{LOOPBACK}:{link_port}")
    supervisor = Supervisor(run_dir / "logs", process_environment(cli_home), Path.cwd())
    started = time.monotonic()
    deadline = started + timeout_s
    error: BaseException | None = None
    status = ""
    try:
        supervisor.start("superlink", [
            flower_executable("flower-superlink"), "--insecure", "--isolation", "subprocess",
            "--disable-runtime-dependency-installation", "--host", LOOPBACK, "--port", str(link_port),
        ], process_environment(flwr_homes / "superlink"))
        wait_for_health(link_port, supervisor, "superlink", timeout_s=min(60.0, timeout_s))
        for site, port in enumerate(node_ports):
            node_config = write_toml_table(
                run_dir / ".flwr" / f"node_config_{site}.toml",
                {"site": site, "data-root": str(root), "state-dir": cfg.federation.site_state_dir},
            )
            node_env = process_environment(flwr_homes / f"supernode-{site}")
            # All sites share this machine: one site's torch threads should not fight another's for cores.
            node_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_sites)))
            supervisor.start(f"supernode-{site}", [
                flower_executable("flower-supernode"), "--insecure", "--superlink", f"{LOOPBACK}:{link_port}",
                "--isolation", "subprocess", "--host", LOOPBACK, "--port", str(port),
                "--node-config", str(node_config),
            ], node_env)
        flwr = flower_executable("flwr")
        supervisor.start("flwr-run", [flwr, "run", str(app), CONNECTION, "--run-config", str(run_config), "--stream"])
        rounds = cfg.federation.rounds
        watched = ["superlink", *[f"supernode-{i}" for i in range(num_sites)]]
        _watch_run(supervisor, watched, run_dir, rounds, deadline, progress)
        status, details = _run_status(supervisor, CONNECTION, flwr, deadline)
        if status != "finished:completed":
            raise DeploymentError(
                f"the run ended as {status!r} {details}; ServerApp log:\n{supervisor.log_tail('flwr-run')}"
            )
        seconds = time.monotonic() - started
        _check_outputs(run_dir, cfg)
    except BaseException as err:
        error = err
        raise
    finally:
        processes = _finish(supervisor, error)
    return FlowerRunResult(
        run_dir, "deployment", status, seconds, num_sites, f"{LOOPBACK}:{link_port}", dict(supervisor.roots),
        processes, supervisor.log_dir,
    )


def local_superlink(flwr_home: Path) -> list[ProcessId]:
    """The SuperLink `flwr run` starts for a local simulation: its command line names FLWR_HOME's log file."""
    found = processes_with_argument("--log-file", str(flwr_home / "local-superlink" / "superlink.log"))
    pids = {p.pid for p in found}
    # A child caught between fork and exec still shows its parent's command line: keep the topmost.
    return [p for p in found if (_stat(p.pid) or (0, 0, ""))[0] not in pids]


def run_flwr_local_simulation(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    data_root: str | Path | None = None,
    run_dir: str | Path | None = None,
    project: str | Path = PROJECT_ROOT,
    timeout_s: float = 600.0,
    progress: bool = True,
) -> FlowerRunResult:
    """`flwr run . local-simulation` on a staged copy of the app, then the SuperLink it leaves behind stopped.

    The local SuperLink listens on ports chosen here (FLWR_LOCAL_SUPERLINK_HTTP_API_PORT and
    FLWR_LOCAL_CONTROL_API_PORT), so it never meets another user's local SuperLink on Flower's default ports.
    """
    if not PROC.is_dir():
        raise DeploymentError("finding the SuperLink that `flwr run` leaves running needs /proc (Linux)")
    config_path, overrides, cfg, _, num_sites, run_dir, app, run_config = _stage_run(
        config_path, overrides, data_root, run_dir, project, "flwr-run"
    )
    flwr_home = run_dir / ".flwr" / "cli"
    # Ray's socket paths must stay under 107 bytes, so its folder is short and in /tmp; unique, so that
    # any Ray process of this run can be recognised by it.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fedecg-ray-", dir="/tmp"))
    http_port, control_port = free_ports(2)
    env = process_environment(flwr_home, ray_tmp)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
    supervisor = Supervisor(run_dir / "logs", env, app)
    cpus = max(1, int(cfg.federation.num_cpus_per_site))
    # The connection `flwr run . local-simulation` names; if pyproject.toml still has [tool.flwr.federations],
    # Flower's migration rewrites it with the same local address.
    write_superlink_connection(flwr_home, LOCAL_SIMULATION, ":local:")

    def adopt_new() -> None:
        if "local-superlink" not in supervisor.roots:
            for proc in local_superlink(flwr_home):
                supervisor.adopt("local-superlink", proc)
        for proc in processes_mentioning(str(ray_tmp)):
            if proc not in supervisor.seen:
                supervisor.adopt(f"ray-{proc.pid}", proc)

    started = time.monotonic()
    deadline = started + timeout_s
    error: BaseException | None = None
    status = ""
    try:
        flwr = flower_executable("flwr")
        supervisor.start("flwr-run", [
            flwr, "run", ".", LOCAL_SIMULATION, "--run-config", str(run_config),
            "--federation-config", f"num-supernodes={num_sites} client-resources-num-cpus={cpus}", "--stream",
        ])
        _watch_run(supervisor, ["local-superlink"], run_dir, cfg.federation.rounds, deadline, progress, on_tick=adopt_new)
        adopt_new()
        status, details = _run_status(supervisor, LOCAL_SIMULATION, flwr, deadline)
        if status != "finished:completed":
            raise DeploymentError(f"the run ended as {status!r} {details}; log:\n{supervisor.log_tail('flwr-run')}")
        seconds = time.monotonic() - started
        _check_outputs(run_dir, cfg)
    except BaseException as err:
        error = err
        raise
    finally:
        try:
            adopt_new()
            processes = _finish(supervisor, error)
        finally:
            shutil.rmtree(ray_tmp, ignore_errors=True)
    if "local-superlink" not in supervisor.roots:
        raise DeploymentError(f"the run finished but no local SuperLink was found for FLWR_HOME={flwr_home}")
    return FlowerRunResult(
        run_dir, "local-simulation", status, seconds, num_sites, f"{LOOPBACK}:{http_port}", dict(supervisor.roots),
        processes, supervisor.log_dir,
    )


# ----------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m simulations.deploy_loopback",
        description="Run the fedecg Flower apps on Flower's deployment engine over loopback "
        "(SuperLink + one SuperNode per site), or with `flwr run . local-simulation`.",
    )
    parser.add_argument("--config", default=str(PROJECT_ROOT / "configs" / "loopback.yaml"), help="YAML config")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override one config value; repeatable")
    parser.add_argument("--data-root", help="PTB-XL folder (default: data.root, else $PTBXL_DIR)")
    parser.add_argument("--out", help="run directory (default: output.dir/output.name-MODE-TIMESTAMP)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds the whole run may take")
    parser.add_argument("--local-simulation", action="store_true",
                        help="use `flwr run . local-simulation` instead of a SuperLink and SuperNodes")
    parser.add_argument("--project", default=str(PROJECT_ROOT), help="the Flower app folder (holds pyproject.toml)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.timeout <= 0:
        print("deploy_loopback: error: --timeout must be positive", file=sys.stderr)
        return 2
    runner = run_flwr_local_simulation if args.local_simulation else run_loopback_deployment
    # A plain SIGTERM would end Python without running the clean-up; as SystemExit it unwinds through it.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    try:
        result = runner(
            args.config, args.overrides, data_root=args.data_root, run_dir=args.out, project=args.project,
            timeout_s=args.timeout, progress=not args.quiet,
        )
    except (ConfigError, FileExistsError, ValueError) as err:
        print(f"deploy_loopback: error: {err}", file=sys.stderr)
        return 2
    except DeploymentError as err:
        print(f"deploy_loopback: the run failed: {err}", file=sys.stderr)
        return 1
    print(
        f"{result.mode}: {result.num_sites} sites, run {result.status} in {result.seconds:.1f}s; "
        f"{len(result.processes)} processes started and stopped\nrun directory: {result.run_dir}\n"
        f"logs: {result.log_dir}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
