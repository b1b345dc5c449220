"""A throwaway certificate authority for a local federation and for tests.

`fedplane up` runs everything authenticated (secure by default) without asking the user for
certificates, so it makes its own CA and issues what each party presents: the hub's gRPC
server, etcd's server, the hub's etcd client, an administrator's client certificate. Keys are
EC P-256 and certificates short-lived; they are written 0600 and never leave the data
directory. Production uses the organisation's own PKI (docs/security.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

LOCAL_NAMES = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Issued:
    """Where a certificate and its key were written (PEM)."""

    cert_file: Path
    key_file: Path


class CertificateAuthority:
    """A CA kept in `directory` (ca.pem, ca.key): made on first use, reused after."""

    def __init__(self, directory: Path, days: int = 30) -> None:
        self.directory = directory
        self.days = days
        self.cert_file = directory / "ca.pem"
        key_file = directory / "ca.key"
        directory.mkdir(parents=True, exist_ok=True)
        if self.cert_file.exists() and key_file.exists():
            self._key = serialization.load_pem_private_key(key_file.read_bytes(), None)
            self._cert = x509.load_pem_x509_certificate(self.cert_file.read_bytes())
            return
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedplane local CA")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    key_cert_sign=True,
                    crl_sign=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        _write(key_file, _key_pem(key))
        _write(self.cert_file, cert.public_bytes(serialization.Encoding.PEM))
        self._key, self._cert = key, cert

    def issue(
        self, name: str, *, server: bool = False, client: bool = False, hosts: tuple[str, ...] = LOCAL_NAMES
    ) -> Issued:
        """A certificate for `name` (its common name; a client's identity), as a server for
        `hosts` and/or as a client; written to <name>.pem and <name>.key beside the CA."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = _now()
        usages = [ExtendedKeyUsageOID.SERVER_AUTH] if server else []
        if client:
            usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=self.days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        )
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName(_alt_names(hosts)), critical=False)
        assert isinstance(self._key, ec.EllipticCurvePrivateKey)
        cert = builder.sign(self._key, hashes.SHA256())
        issued = Issued(self.directory / f"{name}.pem", self.directory / f"{name}.key")
        _write(issued.key_file, _key_pem(key))
        _write(issued.cert_file, cert.public_bytes(serialization.Encoding.PEM))
        return issued


def _alt_names(hosts: tuple[str, ...]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only, from the moment it exists."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
