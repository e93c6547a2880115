"""The loopback run's inputs: bad ones are refused before any process starts; TLS and auth are the default."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from common.data.errors import DataError
from simulations.deploy.certs import (
    CertificateError,
    make_site_key,
    make_tls_certificates,
)
from simulations.deploy.flower import DeploymentError
from simulations.deploy.loopback import (
    INSECURE,
    TLS_AUTH,
    loopback_security,
    superlink_argv,
    supernode_argv,
)
from simulations.deploy.runs import run_loopback_deployment
from simulations.deploy.sites import RegisteredSite, read_registry, write_registry
from simulations.deploy_loopback import main
from tests.e2e.test_deployment import CONFIG


def test_missing_data_root_is_reported_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="no ptbxl_database.csv"):
        run_loopback_deployment(CONFIG, data_root=tmp_path, run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_command_line_exits_2_with_the_fault_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--data-root", str(tmp_path), "--out", str(tmp_path / "run"), "--quiet"]) == 2
    assert f"data.root={tmp_path}: no ptbxl_database.csv" in capsys.readouterr().err
    assert main(["--timeout", "0"]) == 2
    assert "--timeout must be positive" in capsys.readouterr().err
    assert main(["--insecure", "--certs", str(tmp_path)]) == 2
    assert "--insecure and --certs contradict each other" in capsys.readouterr().err
    assert main(["--local-simulation", "--insecure"]) == 2
    assert "apply to the deployment, not --local-simulation" in capsys.readouterr().err


def test_a_certs_folder_without_the_tls_files_fails_before_the_run_is_staged(tmp_path: Path) -> None:
    (tmp_path / "certs").mkdir()
    with pytest.raises(CertificateError, match="no ca.crt, server.pem, server.key"):
        run_loopback_deployment(CONFIG, data_root=tmp_path, run_dir=tmp_path / "run", certs=tmp_path / "certs")
    assert not (tmp_path / "run").exists()


def test_overrides_cannot_hold_the_run_config_separator(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="';' separates overrides"):
        run_loopback_deployment(CONFIG, ["output.name=a;b"], data_root=tmp_path, progress=False)


def test_tls_and_supernode_auth_are_the_default_and_insecure_is_loud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secure = loopback_security(tmp_path / "run", None, insecure=False)
    assert secure.label == TLS_AUTH and secure.tls is not None
    assert secure.tls.ca_cert == tmp_path / "run" / ".flwr" / "certs" / "ca.crt"
    link = superlink_argv(9091, secure)
    assert "--insecure" not in link and "--enable-supernode-auth" in link
    for flag, path in (("--ssl-ca-certfile", secure.tls.ca_cert), ("--ssl-certfile", secure.tls.server_cert),
                       ("--ssl-keyfile", secure.tls.server_key)):
        assert link[link.index(flag) + 1] == str(path)
    key = make_site_key(tmp_path / "site", "site-0")
    node = supernode_argv(9091, 9100, tmp_path / "nc.toml", secure, key)
    assert node[node.index("--root-certificates") + 1] == str(secure.tls.ca_cert)
    assert node[node.index("--auth-supernode-private-key") + 1] == str(key.private)

    given = make_tls_certificates(tmp_path / "given")
    assert loopback_security(tmp_path / "run2", given, insecure=False).tls == given
    assert not (tmp_path / "run2").exists()  # given certificates: nothing new is made

    with caplog.at_level(logging.WARNING):
        insecure = loopback_security(tmp_path / "run3", None, insecure=True)
    assert insecure.label == INSECURE and "INSECURE RUN" in caplog.text
    assert "--insecure" in superlink_argv(9091, insecure) and "--enable-supernode-auth" not in superlink_argv(9091, insecure)
    assert "--insecure" in supernode_argv(9091, 9100, tmp_path / "nc.toml", insecure, None)


def test_the_site_registry_reads_back_and_a_broken_one_is_refused(tmp_path: Path) -> None:
    sites = [RegisteredSite(0, "iid-0", 11, "ecdsa-sha2-nistp384 AAA site-0"),
             RegisteredSite(1, "iid-1", 22, "ecdsa-sha2-nistp384 BBB site-1")]
    path = write_registry(tmp_path / "registry.json", sites)
    assert read_registry(path) == sites
    write_registry(path, [sites[0], RegisteredSite(1, "iid-1", 11, "ecdsa-sha2-nistp384 BBB site-1")])
    with pytest.raises(DeploymentError, match="two sites share a node id"):
        read_registry(path)
    path.write_text('{"sites": [{"site": 0}]}')
    with pytest.raises(DeploymentError, match="not a site registry"):
        read_registry(path)


def test_secure_aggregation_is_the_default_and_plain_aggregation_needs_the_flag(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    from simulations.deploy.runs import secure_aggregation_override

    assert secure_aggregation_override(["train.lr=0.1"], True) == "federation.secure_aggregation=true"
    with caplog.at_level(logging.WARNING):
        assert secure_aggregation_override([], False) == "federation.secure_aggregation=false"
    assert "PLAIN AGGREGATION" in caplog.text
    # A --set that turns SecAgg+ off without the flag is refused, before anything is staged.
    with pytest.raises(ValueError, match="use --no-secure-aggregation"):
        run_loopback_deployment(CONFIG, ["federation.secure_aggregation=false"], data_root=tmp_path,
                                run_dir=tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()
    assert main(["--local-simulation", "--no-secure-aggregation", "--data-root", str(tmp_path)]) == 2
    assert "--no-secure-aggregation applies to the deployment" in capsys.readouterr().err
