"""Statement boundaries, by the same server-exact lexer the wire door uses for session state."""

from __future__ import annotations

from proxy.sqlscan import split_statements


def split(sql: str) -> list[str]:
    """The statements of a (possibly multi-statement) text; empty ones are dropped."""
    return [s for s in split_statements(sql) if s.strip()]
