"""The deployment mode of the loopback run: a SuperLink and one SuperNode per site, TLS and SuperNode auth by default.

With TLS (the default) the SuperLink serves its HTTPS API with a certificate from a private CA, only
SuperNodes whose public keys the operator registered may join, and every client (SuperNodes, `flwr`,
the health check) verifies the SuperLink against that CA. `--insecure` turns all of that off, loudly.
"""

from __future__ import annotations

import logging
import os
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from simulations.deploy.certs import SiteKey, TlsFiles, make_tls_certificates
from simulations.deploy.flower import (
    CONNECTION,
    LOOPBACK,
    flower_executable,
    free_ports,
    process_environment,
    wait_for_health,
    write_superlink_connection,
    write_toml_table,
)
from simulations.deploy.launch import Launch, StagedRun
from simulations.deploy.sites import (
    REGISTRY,
    make_site_keys,
    register_sites,
    site_names,
    write_registry,
)
from simulations.deploy.supervisor import Supervisor

log = logging.getLogger(__name__)
TLS_AUTH = "tls+supernode-auth"
INSECURE = "insecure"


@dataclass(frozen=True)
class Security:
    """How the loopback's processes talk: TLS with SuperNode authentication, or (only when asked) in the clear."""

    tls: TlsFiles | None  # None: --insecure

    @property
    def label(self) -> str:
        return TLS_AUTH if self.tls else INSECURE


def loopback_security(run_dir: Path, tls: TlsFiles | None, insecure: bool) -> Security:
    """The given TLS files, else new ones in RUN/.flwr/certs; none at all only when `insecure` is asked for."""
    if insecure and tls is not None:
        raise ValueError("--insecure and --certs contradict each other: choose one")
    if insecure:
        log.warning(
            "INSECURE RUN: the SuperLink, SuperNodes and `flwr` talk in the clear and any process that reaches "
            "the SuperLink can join as a site (no TLS, no SuperNode authentication). Never use this outside a test."
        )
        return Security(None)
    return Security(tls or make_tls_certificates(run_dir / ".flwr" / "certs"))


def superlink_argv(port: int, security: Security) -> list[str]:
    argv = [
        flower_executable("flower-superlink"), "--isolation", "subprocess", "--disable-runtime-dependency-installation",
        "--host", LOOPBACK, "--port", str(port),
    ]
    if security.tls is None:
        return [*argv, "--insecure"]
    tls = security.tls
    return [*argv, "--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
            "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth"]


def supernode_argv(link_port: int, port: int, node_config: Path, security: Security, key: SiteKey | None) -> list[str]:
    argv = [
        flower_executable("flower-supernode"), "--superlink", f"{LOOPBACK}:{link_port}", "--isolation", "subprocess",
        "--host", LOOPBACK, "--port", str(port), "--node-config", str(node_config),
    ]
    if security.tls is None:
        return [*argv, "--insecure"]
    argv += ["--root-certificates", str(security.tls.ca_cert)]
    return argv + (["--auth-supernode-private-key", str(key.private)] if key else [])


def start_superlink(supervisor: Supervisor, port: int, security: Security, home: Path, timeout_s: float) -> None:
    """Start the SuperLink (FLWR_HOME `home`) and wait until its health endpoint answers, over TLS when on."""
    supervisor.start("superlink", superlink_argv(port, security), process_environment(home))
    wait_for_health(port, supervisor, "superlink", timeout_s, security.tls.ca_cert if security.tls else None)


def connect_cli(cli_home: Path, log_dir: Path, link_port: int, security: Security) -> Supervisor:
    """The `flwr` CLI's connection to this SuperLink, and a supervisor whose processes use it."""
    ca_cert = security.tls.ca_cert if security.tls else None
    write_superlink_connection(cli_home, CONNECTION, f"{LOOPBACK}:{link_port}", ca_cert)
    return Supervisor(log_dir, process_environment(cli_home), Path.cwd())


def _site_plan(
    supervisor: Supervisor, staged: StagedRun, security: Security, deadline: float
) -> list[tuple[int, SiteKey | None]]:
    """(node-config site, key) per SuperNode. Under TLS: keys made, registered, and the site read from the registry."""
    if security.tls is None:
        return [(site, None) for site in range(staged.num_sites)]
    flwr_homes = staged.run_dir / ".flwr"
    keys = make_site_keys(flwr_homes / "sites", staged.num_sites)
    registered = register_sites(
        supervisor, flower_executable("flwr"), CONNECTION, site_names(staged.cfg), keys, deadline
    )
    registry = write_registry(flwr_homes / "superlink" / REGISTRY, registered)
    # The ServerApp binds each site name to its registered node id: a node claiming another site is refused.
    with staged.run_config.open("rb") as handle:
        run_config = tomllib.load(handle)
    write_toml_table(staged.run_config, {**run_config, "site-registry": str(registry)})
    by_public_key = {key.public.read_text().strip(): key for key in keys}
    return [(site.index, by_public_key[site.public_key]) for site in registered]


def deployment_launch(staged: StagedRun, timeout_s: float, security: Security) -> Launch:
    """A SuperLink and one SuperNode per site on 127.0.0.1, each with its own FLWR_HOME (FAB installs never race).

    Under TLS each site gets its own key pair, registered before any SuperNode starts; the registry (site
    -> node id and key) is written on the SuperLink's side and each SuperNode's node config comes from it.
    """
    flwr_homes = staged.run_dir / ".flwr"
    link_port, *node_ports = free_ports(1 + staged.num_sites)
    supervisor = connect_cli(flwr_homes / "cli", staged.run_dir / "logs", link_port, security)

    def start() -> None:
        deadline = time.monotonic() + timeout_s
        start_superlink(supervisor, link_port, security, flwr_homes / "superlink", min(60.0, timeout_s))
        for port, (site, key) in zip(node_ports, _site_plan(supervisor, staged, security, deadline)):
            node_config = write_toml_table(
                flwr_homes / f"node_config_{site}.toml",
                {"site": site, "data-root": str(staged.data_root), "state-dir": staged.cfg.federation.site_state_dir},
            )
            node_env = process_environment(flwr_homes / f"supernode-{site}")
            # All sites share this machine: one site's torch threads should not fight another's for cores.
            node_env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // staged.num_sites)))
            supervisor.start(f"supernode-{site}", supernode_argv(link_port, port, node_config, security, key), node_env)
        supervisor.start("flwr-run", [
            flower_executable("flwr"), "run", str(staged.app), CONNECTION, "--run-config", str(staged.run_config),
            "--stream",
        ])

    watched = ["superlink", *[f"supernode-{i}" for i in range(staged.num_sites)]]
    return Launch(
        "deployment", supervisor, CONNECTION, f"{LOOPBACK}:{link_port}", start, watched, "ServerApp log",
        security=security.label,
    )
