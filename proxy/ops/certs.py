"""Throw-away certificates: a private CA and the certificates it signs, for `pgsluice demo`,
`pgsluice make-cert` (the docker-compose quick start) and the tests.

Not a PKI: ECDSA P-256 keys, SHA-256 signatures, valid for a year, no revocation. For
production use certificates from your own CA; pgsluice only reads PEM files.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

_VALID = datetime.timedelta(days=365)


@dataclass(frozen=True, slots=True)
class Pair:
    """A certificate and its private key, as PEM."""

    cert: bytes
    key: bytes

    def write(self, folder: Path, name: str) -> tuple[Path, Path]:
        """`name`.crt and `name`.key (mode 0600, as libpq and Postgres insist) in `folder`."""
        folder.mkdir(parents=True, exist_ok=True)
        cert, key = folder / f"{name}.crt", folder / f"{name}.key"
        cert.write_bytes(self.cert)
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(self.key)
        key.chmod(0o600)
        return cert, key


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


_HASHES: dict[str, hashes.SHA256 | hashes.SHA384 | hashes.SHA512] = {
    "sha256": hashes.SHA256(), "sha384": hashes.SHA384(), "sha512": hashes.SHA512()}


class Authority:
    """A self-signed CA that signs server and client certificates with ECDSA and `digest`
    ("sha256", "sha384", "sha512"), or with Ed25519 (digest "ed25519", which has no separate
    hash: such certificates allow no tls-server-end-point channel binding)."""

    def __init__(self, common_name: str = "pgsluice throw-away CA", digest: str = "sha256") -> None:
        self._hash = None if digest == "ed25519" else _HASHES[digest]
        self._key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey = (
            ed25519.Ed25519PrivateKey.generate() if self._hash is None
            else ec.generate_private_key(ec.SECP256R1()))
        now = datetime.datetime.now(datetime.UTC)
        self.name = _name(common_name)
        self.cert = (
            x509.CertificateBuilder().subject_name(self.name).issuer_name(self.name)
            .public_key(self._key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(self._key, self._hash))

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, hosts: Iterable[str] = (), client: bool = False) -> Pair:
        """A certificate for a server (`hosts` as subjectAltNames) or, with `client`, for a
        client whose user name is `common_name`."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.now(datetime.UTC)
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder().subject_name(_name(common_name)).issuer_name(self.name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + _VALID)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False))
        names = [_san(h) for h in hosts]
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, self._hash)
        return Pair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def make_server_files(folder: Path, hosts: Iterable[str], clients: Iterable[str] = (),
                      keep: bool = False) -> dict[str, Path]:
    """ca.crt, server.crt/.key (and <user>.crt/.key per client) in `folder`: what `pgsluice
    make-cert` writes. The CA's key is not kept: nothing more can be signed later. With `keep`,
    files already there are left alone (clients may have copied that CA)."""
    out = {"ca": folder / "ca.crt", "cert": folder / "server.crt", "key": folder / "server.key"}
    if keep and all(path.exists() for path in out.values()):
        return out
    ca = Authority()
    folder.mkdir(parents=True, exist_ok=True)
    out["ca"].write_bytes(ca.pem)
    out["cert"], out["key"] = ca.issue("pgsluice", hosts).write(folder, "server")
    for user in clients:
        out[f"{user}.crt"], out[f"{user}.key"] = ca.issue(user, client=True).write(folder, user)
    return out
