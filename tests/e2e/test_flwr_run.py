"""`flwr run . local-simulation` runs the fedecg apps, and the SuperLink it starts is stopped afterwards.

`flwr run` starts a detached local SuperLink and leaves it running; the runner finds it by the log file
named in its command line (inside this run's FLWR_HOME) and stops it, with everything it spawned, by pid.
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from simulations.deploy.runs import run_flwr_local_simulation
from tests.e2e.test_deployment import (
    CONFIG,
    PROJECT,
    check_federated_run,
    ptbxl_for_e2e,
    still_running,
)


@pytest.mark.slow
def test_flwr_run_local_simulation_trains_two_sites_and_its_superlink_is_stopped(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = ptbxl_for_e2e(request)
    pyproject = (PROJECT / "pyproject.toml").read_bytes()
    result = run_flwr_local_simulation(
        CONFIG, [f"data.cache_dir={tmp_path / 'cache'}", f"federation.site_state_dir={tmp_path / 'sites'}"],
        data_root=root, run_dir=tmp_path / "run",
        timeout_s=240, progress=False,
    )
    assert result.status == "finished:completed"
    assert result.num_sites == 2
    check_federated_run(result.run_dir, rounds=2, num_sites=2)

    assert "local-superlink" in result.started
    assert result.started["local-superlink"] in result.processes
    assert [p.pid for p in result.processes if still_running(p)] == []
    host, port = result.superlink.split(":")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), timeout=2).close()

    # `flwr run` rewrites a pyproject.toml with [tool.flwr.federations]; it ran on a staged copy, not the project.
    assert (PROJECT / "pyproject.toml").read_bytes() == pyproject
