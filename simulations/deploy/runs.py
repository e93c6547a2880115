"""The two loopback runs, around one skeleton: stage, start, watch, check, and always stop everything by pid.

Deployment: a SuperLink and one SuperNode per site, then `flwr run APP fedecg-loopback`. Local simulation:
`flwr run . local-simulation`, and afterwards the SuperLink it leaves behind (plus its Ray processes).
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.config import Config, ConfigError, load
from common.run_dir import default_run_dir, read_latest
from simulations.deploy.certs import TlsFiles
from simulations.deploy.flower import (
    LOCAL_SIMULATION,
    LOOPBACK,
    DeploymentError,
    flower_executable,
    free_ports,
    local_superlink,
    process_environment,
    run_status,
    stage_app,
    write_superlink_connection,
    write_toml_table,
)
from simulations.deploy.launch import Launch, StagedRun
from simulations.deploy.loopback import deployment_launch, loopback_security
from simulations.deploy.supervisor import ProcessId, Supervisor, processes_mentioning

log = logging.getLogger(__name__)

PROJECT_ROOT = Path(__file__).resolve().parents[2]


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
    security: str  # tls+supernode-auth | insecure | local-simulation (no network between processes)
    commands: dict[str, list[str]]  # name -> the argv each process was started with


def _resolved_inputs(
    config_path: str | Path, overrides: Sequence[str], data_root: str | Path | None
) -> tuple[Path, list[str], Config, Path]:
    """Absolute config path, overrides with absolute data/cache locations, the loaded config, the data root.

    Flower's app processes run in other working directories, so every path they read must be absolute.
    """
    from common.data.metadata import resolve_root

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


def _prepare_run_dir(run_dir: str | Path | None, cfg: Config, mode: str, resume: bool = False) -> Path:
    """A new run directory; or, to resume, one holding a checkpoint, its earlier attempt's files moved aside."""
    from common.bundle import latest_checkpoint

    if resume:
        if run_dir is None:
            raise ValueError("resuming needs the run directory of the run to continue")
        run_dir = Path(run_dir).resolve()
        if latest_checkpoint(run_dir) is None:
            raise FileNotFoundError(f"{run_dir} holds no checkpoint to resume from")
        _move_attempt_aside(run_dir)
        return run_dir
    if run_dir is None:
        run_dir = default_run_dir(cfg, mode)
    run_dir = Path(run_dir).resolve()
    if latest_checkpoint(run_dir) is not None:
        raise FileExistsError(f"{run_dir} already holds a run; choose a new run directory")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _move_attempt_aside(run_dir: Path) -> None:
    """RUN/.flwr and RUN/logs of the attempts before -> RUN/attempts/N/: kept for the record, never overwritten.

    The new attempt makes its own staged app, TLS files and SuperNode keys (the loopback refuses to overwrite
    credentials); the sites' ledgers and secret keys live in their state directories and carry over.
    """
    attempts = run_dir / "attempts"
    number = 1 + max((int(p.name) for p in attempts.glob("*") if p.name.isdigit()), default=0)
    for name in (".flwr", "logs"):
        if (run_dir / name).exists():
            (attempts / str(number)).mkdir(parents=True, exist_ok=True)
            (run_dir / name).rename(attempts / str(number) / name)


def _stage_run(
    config_path: str | Path, overrides: Sequence[str], data_root: str | Path | None,
    run_dir: str | Path | None, project: str | Path, label: str, resume: bool = False,
) -> StagedRun:
    from common.data.partition import count_sites

    config_path, overrides, cfg, root = _resolved_inputs(config_path, overrides, data_root)
    num_sites = count_sites(cfg)
    run_dir = _prepare_run_dir(run_dir, cfg, label, resume)
    app = stage_app(Path(project), run_dir / ".flwr" / "app")
    values: dict[str, str | bool] = {"config-path": str(config_path), "overrides": ";".join(overrides),
                                     "run-dir": str(run_dir)}
    if resume:  # the ServerApp continues from the run directory's latest checkpoint (RunSpec.resume)
        values["resume"] = True
    run_config = write_toml_table(run_dir / ".flwr" / "run_config.toml", values)
    return StagedRun(config_path, overrides, cfg, root, num_sites, run_dir, app, run_config)


def _rounds_done(run_dir: Path) -> int:
    try:
        return int((read_latest(run_dir) or "").rsplit("_", 1)[-1])  # the ServerApp names them round_NNNN
    except (OSError, ValueError):
        return 0


def _watch_run(launch: Launch, run_dir: Path, rounds: int, deadline: float, progress: bool) -> None:
    """Wait for `flwr run --stream` to return, failing early when a Flower process dies; tqdm over rounds."""
    from tqdm import tqdm

    supervisor = launch.supervisor
    stream = supervisor.popens["flwr-run"]
    with tqdm(total=rounds, desc="federated rounds", unit="round", disable=not progress) as bar:
        while stream.poll() is None:
            launch.poll()
            supervisor.refresh()
            died = supervisor.exited(launch.watched)
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


def _run(staged: StagedRun, launch: Launch, timeout_s: float, progress: bool) -> FlowerRunResult:
    """Start the mode's processes, watch the run to its end, check its outputs; stop everything whatever happens."""
    supervisor = launch.supervisor
    started = time.monotonic()
    deadline = started + timeout_s
    error: BaseException | None = None
    try:
        launch.start()
        _watch_run(launch, staged.run_dir, staged.cfg.federation.rounds, deadline, progress)
        launch.poll()
        status, details = run_status(supervisor, launch.connection, flower_executable("flwr"), deadline)
        if status != "finished:completed":
            raise DeploymentError(
                f"the run ended as {status!r} {details}; {launch.log_label}:\n{supervisor.log_tail('flwr-run')}"
            )
        seconds = time.monotonic() - started
        _check_outputs(staged.run_dir, staged.cfg)
    except BaseException as err:
        error = err
        raise
    finally:
        try:
            launch.poll()
            processes = _finish(supervisor, error)
        finally:
            launch.close()
    return FlowerRunResult(
        staged.run_dir, launch.mode, status, seconds, staged.num_sites, launch.superlink, dict(supervisor.roots),
        processes, supervisor.log_dir, launch.security, dict(supervisor.commands),
    )


def _local_simulation(staged: StagedRun) -> Launch:
    """`flwr run . local-simulation` in the staged app, its local SuperLink on ports chosen here."""
    flwr_home = staged.run_dir / ".flwr" / "cli"
    # Ray's socket paths must stay under 107 bytes, so its folder is short and in /tmp; unique, so that
    # any Ray process of this run can be recognised by it.
    ray_tmp = Path(tempfile.mkdtemp(prefix="fedecg-ray-", dir="/tmp"))
    http_port, control_port = free_ports(2)
    env = process_environment(flwr_home, ray_tmp)
    env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(http_port)
    env["FLWR_LOCAL_CONTROL_API_PORT"] = str(control_port)
    supervisor = Supervisor(staged.run_dir / "logs", env, staged.app)
    cpus = max(1, int(staged.cfg.federation.num_cpus_per_site))
    # The connection `flwr run . local-simulation` names; if pyproject.toml still has [tool.flwr.federations],
    # Flower's migration rewrites it with the same local address.
    write_superlink_connection(flwr_home, LOCAL_SIMULATION, ":local:")

    def start() -> None:
        supervisor.start("flwr-run", [
            flower_executable("flwr"), "run", ".", LOCAL_SIMULATION, "--run-config", str(staged.run_config),
            "--federation-config", f"num-supernodes={staged.num_sites} client-resources-num-cpus={cpus}", "--stream",
        ])

    def adopt_new() -> None:
        if "local-superlink" not in supervisor.roots:
            for proc in local_superlink(flwr_home):
                supervisor.adopt("local-superlink", proc)
        for proc in processes_mentioning(str(ray_tmp)):
            if proc not in supervisor.seen:
                supervisor.adopt(f"ray-{proc.pid}", proc)

    return Launch(
        "local-simulation", supervisor, LOCAL_SIMULATION, f"{LOOPBACK}:{http_port}", start, ["local-superlink"], "log",
        poll=adopt_new, close=lambda: shutil.rmtree(ray_tmp, ignore_errors=True), security="local-simulation",
    )


def run_loopback_deployment(
    config_path: str | Path,
    overrides: Sequence[str] = (),
    data_root: str | Path | None = None,
    run_dir: str | Path | None = None,
    project: str | Path = PROJECT_ROOT,
    timeout_s: float = 600.0,
    progress: bool = True,
    certs: str | Path | None = None,
    insecure: bool = False,
    resume: bool = False,
    secure_aggregation: bool | None = None,
) -> FlowerRunResult:
    """SuperLink + one SuperNode per site on 127.0.0.1, `flwr run` of the fedecg app, then everything stopped.

    TLS and SuperNode authentication are on unless `insecure`: the TLS files come from `certs` (as
    `fedecg deploy certs` writes them) or are made in RUN/.flwr/certs; each site's key pair is made in
    RUN/.flwr/sites and registered, and RUN/.flwr/superlink/site_registry.json records which node id is
    which site. Each SuperNode gets node_config `site` (its index), `data-root` and `state-dir`. Raises
    DeploymentError (after stopping every process) if a process dies, the run fails or times out, or
    outputs are missing.

    `resume` continues the run in `run_dir` (same config and overrides) from its latest checkpoint, after
    a crash or a stop: fresh Flower processes, the ServerApp told `resume = true`; the earlier attempt's
    .flwr and logs folders are moved to RUN/attempts/N/. Each site's spend carries over in its own ledger.

    `secure_aggregation` True (the default for a new run) appends `federation.secure_aggregation=true`: the
    server learns only the weighted mean of the sites' updates (SecAgg+ over the network). False appends
    `=false`, loudly. None: True, or when resuming, what the run directory's saved config says.
    """
    if insecure and certs is not None:
        raise ValueError("--insecure and --certs contradict each other: choose one")
    if secure_aggregation is None:
        secure_aggregation = _saved_secure_aggregation(run_dir) if resume else True
    overrides = [*overrides, secure_aggregation_override(overrides, secure_aggregation)]
    tls = TlsFiles.in_dir(certs) if certs is not None else None  # a wrong folder fails before anything is staged
    staged = _stage_run(config_path, overrides, data_root, run_dir, project, "loopback", resume)
    security = loopback_security(staged.run_dir, tls, insecure)
    return _run(staged, deployment_launch(staged, timeout_s, security), timeout_s, progress)


def _saved_secure_aggregation(run_dir: str | Path | None) -> bool:
    """A resumed run keeps the aggregation it started with (the ServerApp refuses a changed config)."""
    saved = Path(run_dir) / "config.yaml" if run_dir is not None else None
    return load(saved).federation.secure_aggregation if saved is not None and saved.is_file() else True


def secure_aggregation_override(overrides: Sequence[str], secure: bool) -> str:
    """`federation.secure_aggregation=...` as asked; a --set that says otherwise contradicts it."""
    for text in overrides:
        key, _, value = text.partition("=")
        if key.strip() == "federation.secure_aggregation" and value.strip().lower() != str(secure).lower():
            raise ValueError(f"--set {text} contradicts {'the default SecAgg+' if secure else '--no-secure-aggregation'}:"
                             " use --no-secure-aggregation to aggregate in the clear")
    if not secure:
        log.warning("PLAIN AGGREGATION: the server sees every site's update (SecAgg+ off by --no-secure-aggregation)")
    return f"federation.secure_aggregation={str(secure).lower()}"


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
    staged = _stage_run(config_path, overrides, data_root, run_dir, project, "flwr-run")
    result = _run(staged, _local_simulation(staged), timeout_s, progress)
    if "local-superlink" not in result.started:
        raise DeploymentError(f"the run finished but no local SuperLink was found for FLWR_HOME={result.run_dir / '.flwr' / 'cli'}")
    return result
