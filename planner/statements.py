"""Statement boundaries, by the same server-exact lexer the wire door uses for session state."""

from __future__ import annotations

from functools import lru_cache

from planner.sqlscan import split_statements


@lru_cache(maxsize=256)
def _split(sql: str) -> tuple[str, ...]:
    return tuple(s for s in split_statements(sql) if s.strip())


def split(sql: str) -> list[str]:
    """The statements of a (possibly multi-statement) text; empty ones are dropped.
    (Cached: the analysis and the guardrails both ask, for the same text.)"""
    return list(_split(sql))
