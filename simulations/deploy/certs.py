"""Deployment credentials: a private CA, the SuperLink's TLS certificate, and one SuperNode key pair per site.

Who keeps what: the CA certificate goes to every SuperNode and to the operator's `flwr` machine; the
server key and certificate stay on the SuperLink host (the CA key too, or offline); each site's private
key stays at its site and only its public key goes to the SuperLink operator, who registers it.
Flower reads SuperNode keys in OpenSSH format and accepts NIST curves; P-384 is what its docs use.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT = "ca.crt"
CA_KEY = "ca.key"
SERVER_CERT = "server.pem"
SERVER_KEY = "server.key"
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
_HOST_NAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*$")


class CertificateError(ValueError):
    """Credentials that cannot be made where asked, or a folder that does not hold them."""


@dataclass(frozen=True)
class TlsFiles:
    """The SuperLink's TLS files: the CA certificate everyone trusts, the server's certificate and key."""

    ca_cert: Path
    server_cert: Path
    server_key: Path

    @classmethod
    def in_dir(cls, directory: str | Path) -> TlsFiles:
        """The files `fedecg deploy certs --out DIR` wrote, checked to exist."""
        directory = Path(directory).expanduser().resolve()
        files = cls(directory / CA_CERT, directory / SERVER_CERT, directory / SERVER_KEY)
        missing = [p.name for p in (files.ca_cert, files.server_cert, files.server_key) if not p.is_file()]
        if missing:
            raise CertificateError(f"{directory}: no {', '.join(missing)} (make them with `fedecg deploy certs --out DIR`)")
        return files


@dataclass(frozen=True)
class SiteKey:
    """One SuperNode's authentication key pair, OpenSSH-encoded as `flower-supernode` and `flwr` read them."""

    private: Path
    public: Path


def _writable_dir(out: str | Path, names: Sequence[str]) -> Path:
    """`out` as a folder that may receive `names`: never overwrite credentials that already exist."""
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise CertificateError(f"--out {out}: exists and is not a folder")
    clash = [name for name in names if (out / name).exists()]
    if clash:
        raise CertificateError(f"--out {out}: already holds {', '.join(clash)}; choose an empty folder (nothing is overwritten)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise CertificateError(f"--out {out}: cannot create it: {err.strerror or err}") from err
    if not os.access(out, os.W_OK | os.X_OK):
        raise CertificateError(f"--out {out}: not writable")
    return out.resolve()


def _write(path: Path, data: bytes, private: bool) -> None:
    """Private keys are created 0600 from the start: never world-readable, not even for a moment."""
    mode = 0o600 if private else 0o644
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.chmod(path, mode)  # the umask may have narrowed a public file


def _subject_names(hosts: Sequence[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in dict.fromkeys([*DEFAULT_HOSTS, *hosts]):  # ordered, without repeats
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not _HOST_NAME.match(host):
                raise CertificateError(f"--host {host!r}: not an IP address nor a DNS name") from None
            names.append(x509.DNSName(host))
    return names


def _certificate(
    subject: str, public_key: ec.EllipticCurvePublicKey, issuer: x509.Name | None, signer: ec.EllipticCurvePrivateKey,
    days: int, ca: bool,
) -> x509.CertificateBuilder:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder().subject_name(name).issuer_name(issuer or name).public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # tolerate small clock differences between hosts
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
    )
    # A CA only signs certificates; the server's key only signs TLS handshakes (ECDHE).
    usage = dict.fromkeys(("content_commitment", "data_encipherment", "key_agreement", "encipher_only",
                           "decipher_only", "key_encipherment"), False)
    usage.update(key_cert_sign=ca, crl_sign=ca, digital_signature=not ca)
    builder = builder.add_extension(x509.KeyUsage(**usage), critical=True)
    if issuer is not None:
        signer_id = x509.SubjectKeyIdentifier.from_public_key(signer.public_key())
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(signer_id), critical=False
        )
    return builder


def make_tls_certificates(out: str | Path, hosts: Sequence[str] = (), days: int = 825) -> TlsFiles:
    """A private CA and a server certificate it signs, valid for 127.0.0.1, localhost and every `hosts` name.

    Writes ca.crt, ca.key, server.pem and server.key into `out` (created if missing; keys 0600) and
    refuses to overwrite any of them.
    """
    if days <= 0:
        raise CertificateError(f"--days {days}: must be positive")
    alt_names = _subject_names(hosts)
    out = _writable_dir(out, (CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY))
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = _certificate("fedecg deployment CA", ca_key.public_key(), None, ca_key, days, ca=True).sign(ca_key, hashes.SHA384())
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        _certificate("fedecg SuperLink", server_key.public_key(), ca_cert.subject, ca_key, days, ca=False)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    for path, key in ((out / CA_KEY, ca_key), (out / SERVER_KEY, server_key)):
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        _write(path, pem, private=True)
    _write(out / CA_CERT, ca_cert.public_bytes(serialization.Encoding.PEM), private=False)
    _write(out / SERVER_CERT, server_cert.public_bytes(serialization.Encoding.PEM), private=False)
    return TlsFiles(out / CA_CERT, out / SERVER_CERT, out / SERVER_KEY)


def make_site_key(out: str | Path, name: str) -> SiteKey:
    """A P-384 key pair for one SuperNode: OUT/NAME.key (0600, stays at the site) and OUT/NAME.pub (to register)."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise CertificateError(f"site name {name!r}: use letters, digits, '.', '_' or '-' (at most 64)")
    keys = SiteKey(Path(f"{name}.key"), Path(f"{name}.pub"))
    out = _writable_dir(out, (keys.private.name, keys.public.name))
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    _write(out / keys.private, private, private=True)
    _write(out / keys.public, public + f" {name}\n".encode(), private=False)
    return SiteKey(out / keys.private, out / keys.public)
