"""The fedecg apps on Flower's deployment engine: a SuperLink and two SuperNodes over loopback, `flwr run`.

The slow test runs the real thing end to end; the quick ones pin down the pieces it relies on: Flower
reading our TOML files, the staged app, and stopping every process (detached grandchildren included) by pid.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import psutil
import pytest

from common.data.errors import DataError
from common.privacy import verify_release
from simulations.deploy.flower import DeploymentError, stage_app, write_toml_table
from simulations.deploy.runs import run_loopback_deployment
from simulations.deploy.supervisor import ProcessId, Supervisor
from simulations.deploy_loopback import main
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


@pytest.mark.slow
def test_loopback_deployment_trains_two_sites_and_stops_every_process(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = ptbxl_for_e2e(request)
    result = run_loopback_deployment(
        CONFIG, [f"data.cache_dir={tmp_path / 'cache'}", f"federation.site_state_dir={tmp_path / 'sites'}"],
        data_root=root, run_dir=tmp_path / "run", timeout_s=240, progress=False,
    )
    assert result.status == "finished:completed"
    assert result.num_sites == 2
    check_federated_run(result.run_dir, rounds=2, num_sites=2)
    # Each site kept its ledger and secret key under the node's state-dir, outside the run directory.
    assert len(list((tmp_path / "sites").glob("iid-*/ledger.json"))) == 2
    assert len(list((tmp_path / "sites").glob("iid-*/secret.key"))) == 2

    assert {"superlink", "supernode-0", "supernode-1", "flwr-run", "flwr-ls"} == set(result.started)
    # SuperExec, ServerApp and ClientApp processes were seen too, not only the ones started directly.
    assert set(result.started.values()) < set(result.processes)
    assert [p.pid for p in result.processes if still_running(p)] == []
    host, port = result.superlink.split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2).close()
    for name in ("superlink", "supernode-0", "supernode-1", "flwr-run"):
        assert (result.log_dir / f"{name}.log").stat().st_size > 0


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
            run_dir=tmp_path / "run", timeout_s=15, progress=False,
        )
    processes = caught.value.processes
    assert {"superlink", "supernode-0", "supernode-1", "flwr-run"} <= set(processes.values())
    assert [p.pid for p in processes if still_running(p)] == []


def test_missing_data_root_is_reported_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no ptbxl_database.csv"):
        run_loopback_deployment(CONFIG, data_root=tmp_path, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_command_line_exits_2_with_the_fault_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data-root", str(tmp_path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert f"data.root={tmp_path}: no ptbxl_database.csv" in capsys.readouterr().err
    assert main(["--timeout", "0"]) == 2
    assert "--timeout must be positive" in capsys.readouterr().err


def test_overrides_cannot_hold_the_run_config_separator(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="';' separates overrides"):
        run_loopback_deployment(CONFIG, ["output.name=a;b"], data_root=tmp_path, progress=False)


def test_flower_reads_our_toml_files_back_unchanged(tmp_path: Path) -> None:
    from flwr.common.config import parse_config_args

    values = {
        "site": 1,
        "data-root": str(tmp_path / "it's a \"quoted\" path with spaces"),
        "overrides": "data.root=/x;privacy.target_epsilon=4",
        "resume": False,
    }
    path = write_toml_table(tmp_path / "node_config.toml", values)
    assert parse_config_args([str(path)]) == values


def test_staged_app_holds_the_app_and_leaves_the_project_alone(tmp_path: Path) -> None:
    before = (PROJECT / "pyproject.toml").read_bytes()
    app = stage_app(PROJECT, tmp_path / "app")
    assert (app / "pyproject.toml").read_bytes() == before == (PROJECT / "pyproject.toml").read_bytes()
    for module in ("server/server_app.py", "client/client_app.py", "common/config.py", "configs/loopback.yaml"):
        assert (app / module).read_bytes() == (PROJECT / module).read_bytes()
    assert not (app / ".venv").exists()
    assert not list(app.rglob("test_*.py"))  # Flower leaves tests out of app bundles


def test_supervisor_stops_detached_grandchildren_by_pid(tmp_path: Path) -> None:
    # A parent that starts a grandchild in a new session (as Flower starts SuperExec) and keeps running.
    script = (
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'], start_new_session=True)\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    supervisor = Supervisor(tmp_path / "logs", env={}, cwd=tmp_path)
    parent = supervisor.start("parent", [sys.executable, "-c", script], env={"PATH": "/usr/bin:/bin"})
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
