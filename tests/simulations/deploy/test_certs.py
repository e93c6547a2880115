"""`fedecg deploy certs` and `site-key`: a CA chain a TLS client accepts, the right names, private keys 0600."""

from __future__ import annotations

import ipaddress
import socket
import ssl
import stat
import threading
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import (
    load_ssh_private_key,
    load_ssh_public_key,
)
from cryptography.x509.verification import (
    PolicyBuilder,
    ServerVerifier,
    Store,
    VerificationError,
)

from simulations.cli import main as fedecg
from simulations.deploy.certs import (
    CertificateError,
    TlsFiles,
    make_site_key,
    make_tls_certificates,
)


def _server_verifier(ca_cert: Path, name: x509.GeneralName) -> ServerVerifier:
    store = Store([x509.load_pem_x509_certificate(ca_cert.read_bytes())])
    return PolicyBuilder().store(store).build_server_verifier(name)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_server_certificate_chains_to_the_ca_for_every_name_asked(tmp_path: Path) -> None:
    files = make_tls_certificates(tmp_path / "certs", hosts=["superlink.hospital.example", "10.1.2.3"])
    leaf = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "superlink.hospital.example"}
    assert set(san.get_values_for_type(x509.IPAddress)) == {ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("10.1.2.3")}
    for name in (x509.DNSName("localhost"), x509.DNSName("superlink.hospital.example"),
                 x509.IPAddress(ipaddress.ip_address("127.0.0.1"))):
        chain = _server_verifier(files.ca_cert, name).verify(leaf, [])
        assert chain[-1].subject == x509.load_pem_x509_certificate(files.ca_cert.read_bytes()).subject
    with pytest.raises(VerificationError):
        _server_verifier(files.ca_cert, x509.DNSName("elsewhere.example")).verify(leaf, [])


def _echo_over_tls(files: TlsFiles, client_ca: Path) -> bytes:
    """One TLS handshake between the server's key/certificate and a client that trusts only `client_ca`."""
    server_context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_context.load_cert_chain(files.server_cert, files.server_key)
    listener = socket.create_server(("127.0.0.1", 0))

    def serve() -> None:
        conn, _ = listener.accept()
        try:
            with server_context.wrap_socket(conn, server_side=True) as tls:
                tls.sendall(tls.recv(5))
        except (ssl.SSLError, OSError):
            pass  # the client refused the certificate

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        client_context = ssl.create_default_context(cafile=str(client_ca))  # checks the chain and the host name
        with (socket.create_connection(listener.getsockname(), timeout=10) as raw,
              client_context.wrap_socket(raw, server_hostname="127.0.0.1") as tls):
            tls.sendall(b"hello")
            return tls.recv(5)
    finally:
        thread.join(timeout=10)
        listener.close()


def test_a_tls_client_trusting_the_ca_accepts_the_server_and_one_trusting_another_ca_refuses_it(tmp_path: Path) -> None:
    files = make_tls_certificates(tmp_path / "certs")
    assert _echo_over_tls(files, files.ca_cert) == b"hello"
    other = make_tls_certificates(tmp_path / "other")
    with pytest.raises(ssl.SSLCertVerificationError):
        _echo_over_tls(files, other.ca_cert)


def test_private_keys_are_0600_and_the_folder_is_read_back(tmp_path: Path) -> None:
    files = make_tls_certificates(tmp_path / "certs")
    assert _mode(files.server_key) == _mode(tmp_path / "certs" / "ca.key") == 0o600
    assert _mode(files.ca_cert) == _mode(files.server_cert) == 0o644
    assert TlsFiles.in_dir(tmp_path / "certs") == files
    (tmp_path / "certs" / "server.key").unlink()
    with pytest.raises(CertificateError, match="no server.key"):
        TlsFiles.in_dir(tmp_path / "certs")


def test_a_site_key_is_what_flower_loads_and_stays_0600(tmp_path: Path) -> None:
    key = make_site_key(tmp_path / "hospital-a", "hospital-a")
    assert _mode(key.private) == 0o600
    private = load_ssh_private_key(key.private.read_bytes(), None)  # as flower-supernode reads it
    public = load_ssh_public_key(key.public.read_bytes())  # as `flwr supernode register` reads it
    assert private.curve.name == public.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()
    with pytest.raises(CertificateError, match="site name"):
        make_site_key(tmp_path, "../escape")


@pytest.mark.parametrize("case", ["a file", "existing credentials", "bad host"])
def test_bad_out_or_host_is_a_clear_error_and_nothing_is_overwritten(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    out, hosts, expected = tmp_path / "certs", [], ""
    if case == "a file":
        out.write_text("not a folder")
        expected = "exists and is not a folder"
    elif case == "existing credentials":
        make_tls_certificates(out)
        expected = "already holds ca.crt, ca.key, server.pem, server.key"
    else:
        hosts, expected = ["--host", "two words"], "not an IP address nor a DNS name"
    before = {p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else None
    assert fedecg(["deploy", "certs", "--out", str(out), *hosts]) == 2
    assert expected in capsys.readouterr().err
    assert ({p.name: p.read_bytes() for p in out.iterdir()} if out.is_dir() else None) == before


def test_the_command_writes_the_four_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert fedecg(["deploy", "certs", "--out", str(tmp_path / "c"), "--host", "link.example"]) == 0
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["ca.crt", "ca.key", "server.key", "server.pem"]
    assert "valid for: 127.0.0.1, localhost, link.example" in capsys.readouterr().out
