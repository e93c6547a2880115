"""The fedecg apps on Flower's deployment engine: a SuperLink and two SuperNodes over loopback, `flwr run`.

Real processes end to end: the default run (TLS from a private CA, only registered SuperNode keys may
join, SecAgg+ over the network, the site registry at the server) trains and leaves nothing running; a
SuperNode whose key was never registered is refused; a run that cannot finish fails clearly. The pieces
these rely on have unit tests in tests/simulations/deploy/.
"""

from __future__ import annotations

import csv
import json
import re
import socket
import stat
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest

from common.privacy import verify_release
from simulations.deploy.certs import make_tls_certificates
from simulations.deploy.flower import (
    CONNECTION,
    DeploymentError,
    flower_executable,
    flwr_json,
    free_ports,
    process_environment,
    write_toml_table,
)
from simulations.deploy.loopback import (
    TLS_AUTH,
    Security,
    connect_cli,
    start_superlink,
    supernode_argv,
)
from simulations.deploy.runs import FlowerRunResult, run_loopback_deployment
from simulations.deploy.sites import (
    REGISTRY,
    make_site_keys,
    read_registry,
    register_sites,
)
from simulations.deploy.supervisor import ProcessId
from tests.fixtures_ptbxl import SHARED_PTBXL

PROJECT = Path(__file__).resolve().parents[2]
CONFIG = PROJECT / "configs" / "loopback.yaml"


def ptbxl_for_e2e(request: pytest.FixtureRequest) -> Path:
    """../shared/ptb-xl when present, else the 40-record test folder."""
    if (SHARED_PTBXL / "ptbxl_database.csv").is_file():
        return SHARED_PTBXL.resolve()
    return request.getfixturevalue("tiny_ptbxl").root


def still_running(proc: ProcessId) -> bool:
    """Written apart from the module under test: same pid, same creation time, not a zombie."""
    try:
        handle = psutil.Process(proc.pid)
        return handle.create_time() == proc.create_time and handle.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def check_federated_run(run_dir: Path, rounds: int, num_sites: int) -> None:
    """What a user of a finished run relies on: a checkpoint per round, per-site metrics, a valid certificate."""
    for r in range(1, rounds + 1):
        assert (run_dir / "checkpoints" / f"round_{r:04d}" / "checkpoint.json").is_file(), f"no checkpoint for round {r}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"round_{rounds:04d}"
    with (run_dir / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    sites = {f"iid-{i}" for i in range(num_sites)}  # configs/loopback.yaml partitions iid
    for r in range(1, rounds + 1):
        trained = {row["site"] for row in rows if int(row["round"]) == r and row["site"] != "global"}
        assert trained == sites, f"round {r}: metrics for {sorted(trained)}, expected {sorted(sites)}"
    for row in rows:
        if row["site"] != "global":
            assert row["loss"] == "" and float(row["epsilon"]) > 0  # under DP no loss leaves a site
            assert int(row["steps"]) > 0
    certificate = json.loads((run_dir / "privacy.json").read_text())
    assert verify_release(run_dir) == []
    assert len(certificate["sites"]) == num_sites
    assert 0 < certificate["release"]["epsilon"] <= 10.0


def check_tls_and_auth(result: FlowerRunResult) -> None:
    """The run's processes spoke TLS, and exactly the registered site keys joined, each as its registered site."""
    assert result.security == TLS_AUTH
    commands = result.commands
    assert all("--insecure" not in argv for argv in commands.values())
    superlink = commands["superlink"]
    assert "--enable-supernode-auth" in superlink
    certs = Path(superlink[superlink.index("--ssl-ca-certfile") + 1]).parent
    assert stat.S_IMODE((certs / "server.key").stat().st_mode) == 0o600
    assert "Uvicorn running on https://" in (result.log_dir / "superlink.log").read_text()

    flwr_home = result.run_dir / ".flwr"
    registry = read_registry(flwr_home / "superlink" / REGISTRY)
    assert [site.index for site in registry] == list(range(result.num_sites))
    for site in registry:
        argv = commands[f"supernode-{site.index}"]
        key = Path(argv[argv.index("--auth-supernode-private-key") + 1])
        assert stat.S_IMODE(key.stat().st_mode) == 0o600
        assert key.with_suffix(".pub").read_text().strip() == site.public_key  # the key registered for this site
        assert argv[argv.index("--root-certificates") + 1] == str(certs / "ca.crt")
        node_config = (flwr_home / f"node_config_{site.index}.toml").read_text()
        assert f"site = {site.index}\n" in node_config
    activated = re.findall(r"Activated node_id=(\d+)", (result.log_dir / "superlink.log").read_text())
    assert sorted(set(map(int, activated))) == sorted(site.node_id for site in registry)


def check_secure_aggregation(result: FlowerRunResult, rounds: int) -> None:
    """SecAgg+ was on by default and really ran over the network: the server unmasked a sum every round, from
    both sites, each site's ClientApp answered the four SecAgg+ stages, and no update was left out."""
    from common.config import load

    cfg = load(result.run_dir / "config.yaml")
    assert cfg.federation.secure_aggregation
    server_log = (result.log_dir / "flwr-run.log").read_text()
    sites = result.num_sites
    assert server_log.count(f"[Stage 2] Received masked vectors from {sites} clients.") == rounds
    assert server_log.count(f"[Stage 3] Received key shares from {sites} clients.") == rounds
    assert server_log.count("INFO:Secure aggregation completed.") == rounds
    for site in range(sites):  # one ClientApp process per message: a train message and four stages per round
        supernode_log = (result.log_dir / f"supernode-{site}.log").read_text()
        assert supernode_log.count("Start `flwr-clientapp` process") >= 5 * rounds
    with (result.run_dir / "metrics.csv").open() as handle:
        assert [row for row in csv.DictReader(handle) if row["rejected"]] == []
    # The ServerApp was given the site registry: each site name is bound to its registered node id.
    assert f'site-registry = "{result.run_dir / ".flwr" / "superlink" / REGISTRY}"' in (
        result.run_dir / ".flwr" / "run_config.toml").read_text()


@pytest.mark.slow
def test_default_loopback_deployment_uses_tls_and_registered_keys_trains_and_stops_every_process(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = ptbxl_for_e2e(request)
    result = run_loopback_deployment(
        CONFIG, [f"data.cache_dir={tmp_path / 'cache'}", f"federation.site_state_dir={tmp_path / 'sites'}"],
        data_root=root, run_dir=tmp_path / "run", timeout_s=600, progress=False,
    )
    assert result.status == "finished:completed"
    assert result.num_sites == 2
    check_federated_run(result.run_dir, rounds=2, num_sites=2)
    check_tls_and_auth(result)
    check_secure_aggregation(result, rounds=2)
    # Each site kept its ledger and secret key under the node's state-dir, outside the run directory.
    assert len(list((tmp_path / "sites").glob("iid-*/ledger.json"))) == 2
    assert len(list((tmp_path / "sites").glob("iid-*/secret.key"))) == 2

    assert {"superlink", "supernode-0", "supernode-1", "register-site-0", "register-site-1", "flwr-run",
            "flwr-ls"} == set(result.started)
    # SuperExec, ServerApp and ClientApp processes were seen too, not only the ones started directly.
    assert set(result.started.values()) < set(result.processes)
    assert [p.pid for p in result.processes if still_running(p)] == []
    host, port = result.superlink.split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2).close()
    for name in ("superlink", "supernode-0", "supernode-1", "flwr-run"):
        assert (result.log_dir / f"{name}.log").stat().st_size > 0


def _wait_until(condition: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


@pytest.mark.slow
def test_a_supernode_without_a_registered_key_is_refused_while_a_registered_one_joins(tmp_path: Path) -> None:
    security = Security(make_tls_certificates(tmp_path / "certs"))
    link_port, *node_ports = free_ports(4)
    supervisor = connect_cli(tmp_path / "cli", tmp_path / "logs", link_port, security)
    registered, unregistered = make_site_keys(tmp_path / "keys", 2)
    node_config = write_toml_table(tmp_path / "node_config.toml", {"site": 0})
    flwr = flower_executable("flwr")
    try:
        start_superlink(supervisor, link_port, security, tmp_path / "superlink", timeout_s=120)
        [site] = register_sites(supervisor, flwr, CONNECTION, ["iid-0"], [registered], time.monotonic() + 120)
        nodes = {"intruder": unregistered, "keyless": None, "site-0": registered}
        for (name, key), port in zip(nodes.items(), node_ports):
            supervisor.start(name, supernode_argv(link_port, port, node_config, security, key),
                             process_environment(tmp_path / name))

        refused = ["intruder", "keyless"]
        assert _wait_until(lambda: len(supervisor.exited(refused)) == 2, 180), "an unregistered SuperNode kept running"
        assert all(code not in (0, None) for _, code in supervisor.exited(refused))
        assert "Failed to activate SuperNode" in supervisor.log_tail("intruder")
        assert "Failed to initialize the connection" in supervisor.log_tail("keyless")

        def listed() -> list[tuple[str, str]]:
            answer = flwr_json(supervisor, "flwr-supernode-ls", [flwr, "supernode", "ls", CONNECTION],
                               time.monotonic() + 60)
            return [(node["node-id"], node["status"]) for node in answer["nodes"]]

        assert _wait_until(lambda: listed() == [(str(site.node_id), "online")], 120), listed()
        assert supervisor.exited(["site-0", "superlink"]) == []
    finally:
        assert supervisor.stop_all() == []
    assert [p.pid for p in supervisor.seen if still_running(p)] == []


@pytest.mark.slow
def test_a_run_that_times_out_fails_clearly_and_leaves_nothing_running(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = ptbxl_for_e2e(request)
    # Three required sites but two SuperNodes: the ServerApp waits for a third that never comes.
    with pytest.raises(DeploymentError, match="in time|within") as caught:
        run_loopback_deployment(
            CONFIG, ["federation.min_sites=3", f"data.cache_dir={tmp_path / 'cache'}",
                     f"federation.site_state_dir={tmp_path / 'sites'}"], data_root=root,
            run_dir=tmp_path / "run", timeout_s=40, progress=False,
        )
    processes = caught.value.processes
    assert {"superlink", "supernode-0", "supernode-1", "flwr-run"} <= set(processes.values())
    assert [p.pid for p in processes if still_running(p)] == []
