"""Client session settings: what a backend must be set to before it serves a client.

A client's settings are its startup parameters (applied with set_config, which takes
the raw string exactly as a startup packet does) followed by the SET statements it ran
outside transactions, latest per name. Two clients with equal tuples can share a
backend with no round trip.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from proxy.pgwire.encode import quote_literal
from proxy.pgwire.errors import PgError

if TYPE_CHECKING:
    from proxy.backends.backend import Backend

Settings = tuple[tuple[str, str], ...]

# Startup keys that are not run-time settings.
_NOT_SETTINGS = frozenset({"user", "database", "options", "replication"})
_PLAIN_NAME = re.compile(r"^[a-z_][a-z0-9_$]*(\.[a-z_][a-z0-9_$]*)*$")


def set_config(name: str, value: str) -> str:
    return f"SELECT pg_catalog.set_config({quote_literal(name)}, {quote_literal(value)}, false)"


def parse_options(options: str) -> list[tuple[str, str]]:
    """The -c name=value / --name=value pairs of a startup `options` string.

    >>> parse_options("-c search_path=app,public --statement_timeout=5s -c x\\\\ y=1")
    [('search_path', 'app,public'), ('statement_timeout', '5s'), ('x y', '1')]
    """
    words: list[str] = []
    current: list[str] = []
    escaped = False
    for ch in options:
        if escaped:
            current.append(ch)
            escaped = False
        elif ch == "\\":
            escaped = True
        elif ch.isspace():
            if current:
                words.append("".join(current))
                current = []
        else:
            current.append(ch)
    if current:
        words.append("".join(current))
    pairs: list[tuple[str, str]] = []
    i = 0
    while i < len(words):
        word = words[i]
        if word == "-c" and i + 1 < len(words):
            word = words[i + 1]
            i += 1
        elif word.startswith(("-c", "--")):
            word = word[2:]
        else:
            i += 1
            continue
        name, sep, value = word.partition("=")
        if sep:
            pairs.append((name.replace("-", "_"), value))
        i += 1
    return pairs


def settings_from_startup(params: dict[str, str]) -> Settings:
    items: dict[str, tuple[str, str]] = {}
    for key, value in params.items():
        if key.lower() not in _NOT_SETTINGS:
            items[key.lower()] = (key.lower(), set_config(key, value))
    for key, value in parse_options(params.get("options", "")):
        items[key.lower()] = (key.lower(), set_config(key, value))
    return tuple(items.values())


def set_statement(name: str, value_sql: str) -> str:
    ident = name if _PLAIN_NAME.match(name) else '"' + name.replace('"', '""') + '"'
    return f"SET {ident} TO {value_sql}"


def apply_changes(current: Settings, startup: Settings,
                  changes: tuple[tuple[str, str | None], ...]) -> Settings:
    """Fold SET/RESET effects (from sqlscan) into a settings tuple.

    RESET name returns to the startup value (as Postgres does for startup parameters);
    RESET ALL returns to the startup set.
    """
    startup_map = dict(startup)
    merged = dict(current)
    for name, value in changes:
        if name == "*":
            merged = dict(startup)
        elif value is None:
            merged.pop(name, None)
            if name in startup_map:
                merged[name] = startup_map[name]
        else:
            merged.pop(name, None)  # keep order: latest SET last
            merged[name] = set_statement(name, value)
    return tuple(merged.items())


async def resync(backend: Backend, settings: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Bring a backend's session settings to `settings`; returns the ParameterStatus it reported.

    A failing setting is the client's error (bad TimeZone at startup, say): raised as
    PgError with Postgres's SQLSTATE and message.
    """
    statements = [sql for _, sql in settings]
    if backend.applied is None or backend.applied:
        statements.insert(0, "RESET ALL")
    if not statements:
        backend.applied = settings
        return {}
    result = await backend.run(";".join(statements))
    if result.error is not None:
        backend.applied = None
        err = result.error
        raise PgError(err.get("C", "XX000"), err.get("M", "could not apply session settings"),
                      severity="FATAL", detail=err.get("D"), hint=err.get("H"))
    backend.applied = settings
    return result.params
