"""The files Flower reads from us: node/run config TOML, the CLI's SuperLink connection, the staged app."""

from __future__ import annotations

from pathlib import Path

import pytest

from simulations.deploy.flower import (
    stage_app,
    write_superlink_connection,
    write_toml_table,
)
from tests.e2e.test_deployment import PROJECT


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


def _flower_reads_connection(home: Path, monkeypatch: pytest.MonkeyPatch, name: str):
    from flwr.cli.config_utils import load_certificate_in_connection
    from flwr.cli.flower_config import read_superlink_connection

    monkeypatch.setenv("FLWR_HOME", str(home))
    connection = read_superlink_connection(name)
    return connection, load_certificate_in_connection(connection)


def test_the_cli_connection_trusts_our_ca_or_is_explicitly_insecure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca = tmp_path / "certs" / "ca.crt"
    ca.parent.mkdir()
    ca.write_bytes(b"-----BEGIN CERTIFICATE-----\n")
    write_superlink_connection(tmp_path / "tls", "link", "127.0.0.1:9093", ca)
    connection, root_certificates = _flower_reads_connection(tmp_path / "tls", monkeypatch, "link")
    assert connection.address == "127.0.0.1:9093"
    assert not connection.insecure
    assert root_certificates == ca.read_bytes()  # the bytes the CLI's HTTPS client will trust

    write_superlink_connection(tmp_path / "plain", "link", "127.0.0.1:9093")
    connection, root_certificates = _flower_reads_connection(tmp_path / "plain", monkeypatch, "link")
    assert connection.insecure and root_certificates is None


def test_staged_app_holds_the_app_and_leaves_the_project_alone(tmp_path: Path) -> None:
    before = (PROJECT / "pyproject.toml").read_bytes()
    app = stage_app(PROJECT, tmp_path / "app")
    assert (app / "pyproject.toml").read_bytes() == before == (PROJECT / "pyproject.toml").read_bytes()
    for module in ("server/server_app.py", "client/client_app.py", "common/config.py", "configs/loopback.yaml"):
        assert (app / module).read_bytes() == (PROJECT / module).read_bytes()
    assert not (app / ".venv").exists()
    assert not list(app.rglob("test_*.py"))  # Flower leaves tests out of app bundles
