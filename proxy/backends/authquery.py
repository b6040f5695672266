"""auth_user + auth_query: the secret Postgres holds for a user, read afresh for every login.

Rules: nothing is cached, so a password changed on Postgres, a role made NOLOGIN or a
password past its VALID UNTIL counts from the next login on (the query decides what is usable;
the default is PgBouncer's). A query that fails says `unavailable` and is logged (once a minute
at most); the login then falls back to Postgres checking a cleartext password, which is only
asked for over TLS or loopback.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import asyncpg

from proxy.pgwire.scram import ScramSecret, is_md5_hash, parse_scram_secret

log = logging.getLogger("pgsluice.auth")
_WARN_EVERY = 60.0

Kind = Literal["scram", "md5", "plain", "none", "missing", "unavailable"]


@dataclass(frozen=True, slots=True)
class Found:
    """What the auth query said about one user: a secret (scram, md5 or a plain password), no
    password (`none`: NULL, e.g. expired), no row (`missing`: no such role, or it may not log
    in, or auth_user may not see it), or no answer (`unavailable`)."""

    kind: Kind
    scram: ScramSecret | None = field(default=None, repr=False)
    value: str = field(default="", repr=False)  # the md5 hash or plain password

    @property
    def has_secret(self) -> bool:
        return self.kind in ("scram", "md5", "plain")


UNAVAILABLE = Found("unavailable")


def classify(value: str | None) -> Found:
    """A secret as pg_authid.rolpassword holds it (or a plain password from a custom query)."""
    if value is None or value == "":
        return Found("none")
    if value.startswith("SCRAM-SHA-256$"):
        return Found("scram", parse_scram_secret(value), value)  # ValueError if malformed
    if is_md5_hash(value):
        return Found("md5", value=value)
    return Found("plain", value=value)


class AuthQuery:
    """A small asyncpg pool logged in as auth_user, running auth_query($1 = user name)."""

    def __init__(self, query: str, timeout: float, **connect: Any) -> None:
        self.query = query
        self.timeout = timeout
        self._connect = connect
        self._pool: asyncpg.Pool | None = None
        self._warned = 0.0
        self.lookups = 0
        self.failures = 0

    async def lookup(self, user: str) -> Found:
        self.lookups += 1
        for attempt in (1, 2):  # a connection Postgres dropped (a restart) fails once
            try:
                async with asyncio.timeout(self.timeout):
                    if self._pool is None:
                        self._pool = await asyncpg.create_pool(min_size=0, max_size=2, **self._connect)
                    row = await self._pool.fetchrow(self.query, user)
                if row is None:
                    return Found("missing")
                if len(row) < 2 or not (row[1] is None or isinstance(row[1], str)):
                    raise ValueError("auth_query must return (user name, secret text)")
                return classify(row[1])
            except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError) as exc:
                if attempt == 2:
                    return self._failed(exc)
            except (TimeoutError, ValueError, asyncpg.PostgresError) as exc:
                return self._failed(exc)
        return UNAVAILABLE  # not reached

    def _failed(self, exc: BaseException) -> Found:
        self.failures += 1
        now = time.monotonic()
        if now - self._warned > _WARN_EVERY:
            self._warned = now
            log.warning("auth_query failed (%s: %s): passwords are checked by Postgres, over TLS "
                        "or loopback only, until it works", type(exc).__name__, exc)
        return UNAVAILABLE

    async def close(self) -> None:
        if self._pool is not None:
            pool, self._pool = self._pool, None
            try:
                async with asyncio.timeout(2):
                    await pool.close()
            except TimeoutError:
                pool.terminate()
