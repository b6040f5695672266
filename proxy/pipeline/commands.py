"""What the relay reads in a statement's text besides the planner: pgsluice's own SHOW
commands, EXECUTE of a protocol-level statement, DROP / ALTER DATABASE, agent tags, and the
startup parameters a RESET takes away. None of them sends anything: relay.py does."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING

from planner import sqlscan
from planner.explain import describe
from planner.normalize import comment_hints
from proxy.pgwire import encode

if TYPE_CHECKING:
    from proxy.pipeline.session import Session

_EXECUTE = re.compile(rb'(?is)execute\s+("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)(\s*\(.*\))?\s*;?\s*')


def executed(s: Session, sql: bytes) -> tuple[bytes, bytes] | None:
    """(client name, arguments) of `EXECUTE name [(args)]` naming one of the client's
    protocol-level statements (kept on backends under another name), else None."""
    m = _EXECUTE.fullmatch(sql)
    if m is None:
        return None
    raw = m.group(1)
    name = raw[1:-1].replace(b'""', b'"') if raw[:1] == b'"' else raw.lower()
    return (name, m.group(2) or b"") if name in s.statements else None


_NAME = rb'("(?:[^"]|"")+"|[a-z_][a-z0-9_$]*)'
_DATABASE_DDL = re.compile(rb"(?is)(?:drop\s+database\s+(?:if\s+exists\s+)?" + _NAME
                           + rb"|alter\s+database\s+" + _NAME + rb"\s+rename\b)")


def database_ddl(s: Session, sql: bytes) -> None:
    """DROP DATABASE / ALTER DATABASE ... RENAME: pgsluice's idle connections to that
    database must not be in its way."""
    m = _DATABASE_DDL.match(sql)
    if m is not None:
        raw = m.group(1) or m.group(2)
        name = raw[1:-1].replace(b'""', b'"') if raw[:1] == b'"' else raw.lower()
        s.server.database_going(name.decode("utf-8", "replace"))


_SHOW_PLAN = re.compile(rb"(?is)\s*show\s+plan\s+('(?:[^']|'')*')\s*;?\s*")
_SHOW_CACHE = re.compile(rb"(?is)\s*show\s+cache\s*;?\s*")


def show_sql(s: Session, sql: bytes) -> bytes | None:
    """The query that answers a pgsluice SHOW (simple or extended protocol), else None."""
    if s.server.cache is not None and _SHOW_CACHE.fullmatch(sql):
        return values_query(("name", "value"), s.server.cache_rows())
    m = _SHOW_PLAN.fullmatch(sql)
    if m is None:
        return None
    text = m.group(1)[1:-1].replace(b"''", b"'").decode("utf-8", "replace")
    plan = s.server.planner_for(s.database).analyze(text, s.facts)
    return values_query(("plan",), [(line,) for line in describe(plan).splitlines()])


def values_query(columns: tuple[str, ...], rows: Sequence[tuple[str, ...]]) -> bytes:
    values = ", ".join("(" + ", ".join(encode.quote_literal(v) for v in row) + ")" for row in rows)
    return f"SELECT * FROM (VALUES {values}) AS pgsluice({', '.join(columns)})".encode()


def tag_agent(s: Session, sql: bytes) -> None:
    for key, value in comment_hints(sql.decode("utf-8", "replace")):
        if key == "agent" and value:
            s.set_agent(value[:64])


def restore_startup(s: Session, sql: bytes) -> bytes | None:
    """On the server connection, startup parameters are session SETs, so RESET returns to
    the server's defaults; Postgres would return to the client's startup values. A Query
    that resets any of them is followed by one (its replies swallowed, ParameterStatus
    passed on) that sets them again; it shares the transaction, so a rollback undoes both."""
    effect = sqlscan.scan_cached(sql.decode("utf-8", "replace"))
    startup = dict(s.startup_settings)
    names = [name for name, value in effect.settings if value is None]
    statements = list(startup.values()) if "*" in names else [startup[n] for n in names if n in startup]
    if not statements:
        return None
    return encode.query(";".join(statements))
