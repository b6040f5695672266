"""Cache keys: what a cached answer depends on, as DESIGN.md ("Consistency of the cache") says.

    key = (database, role, policy, settings that can change a result, fingerprint,
           lifted parameters, result-format marker, versions of every table read)

Settings are kept by *exclusion*: every setting the session has (startup parameters and
SETs) is part of the key unless it is known not to change what a query returns. That
keeps custom settings read by row-level-security policies (`app.tenant_id`) in the key.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Hashable, Iterable

# Settings that never change a read's result rows or their text form.
IRRELEVANT = frozenset({
    "application_name", "statement_timeout", "lock_timeout", "idle_in_transaction_session_timeout",
    "idle_session_timeout", "transaction_timeout", "work_mem", "maintenance_work_mem",
    "hash_mem_multiplier", "temp_buffers", "effective_cache_size", "random_page_cost",
    "seq_page_cost", "cpu_tuple_cost", "cpu_index_tuple_cost", "cpu_operator_cost",
    "parallel_setup_cost", "parallel_tuple_cost", "max_parallel_workers_per_gather",
    "jit", "jit_above_cost", "jit_inline_above_cost", "jit_optimize_above_cost",
    "geqo", "from_collapse_limit", "join_collapse_limit", "plan_cache_mode",
    "log_statement", "log_min_duration_statement", "log_min_messages", "client_min_messages",
    "default_transaction_isolation", "default_transaction_read_only", "default_transaction_deferrable",
    "synchronous_commit", "pgsluice.max_staleness", "pgsluice.agent",
})
_IRRELEVANT_PREFIXES = ("enable_", "auto_explain.", "pg_stat_statements.")


def relevant_settings(settings: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """The (name, statement) pairs of a session's settings that belong in a cache key."""
    return tuple((name, sql) for name, sql in settings
                 if name not in IRRELEVANT and not name.startswith(_IRRELEVANT_PREFIXES))


_DURATION = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?)\s*(ms|s|sec|secs|seconds?|min|m|h)?\s*$", re.I)
_UNITS = {"ms": 0.001, "s": 1.0, "sec": 1.0, "secs": 1.0, "second": 1.0, "seconds": 1.0,
          "min": 60.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float | None:
    """'5s', '250ms', '2 min', '0', '1.5' (seconds) -> seconds; None if not a duration.

    >>> parse_duration("250ms"), parse_duration("5s"), parse_duration("0"), parse_duration("x")
    (0.25, 5.0, 0.0, None)
    """
    m = _DURATION.match(text.strip().strip("'\""))
    if m is None:
        return None
    return float(m.group(1)) * _UNITS[(m.group(2) or "s").lower()]


_SET_VALUE = re.compile(r"(?is)\bTO\s+(.+?)\s*$")


def setting_value(statement: str) -> str:
    """The value of a `SET name TO value` / set_config(...) statement kept in session settings."""
    if statement.startswith("SELECT pg_catalog.set_config("):
        literals = re.findall(r"'((?:[^']|'')*)'", statement)
        return literals[1].replace("''", "'") if len(literals) > 1 else ""
    m = _SET_VALUE.search(statement)
    return m.group(1).strip().strip("'") if m else ""


def make_key(database: str, user: str, policy: str, settings: Hashable, fingerprint: str,
             params: tuple[str, ...], fmt: Hashable, versions: Hashable) -> tuple[Hashable, ...]:
    return (database, user, policy, settings, fingerprint, params, fmt, versions)


_SHARED_PARTS = 4  # database, user, policy, settings: the same objects in every key of a session


def key_footprint(key: Hashable) -> int:
    """Bytes a cache key holds of its own (for cache_max_bytes): the tuple and what is in it,
    except the parts every key of a session shares (make_key's first four).

    >>> key_footprint(make_key("db", "u", "", (), "f" * 32, ("1",), b"Q", ("g", (1, 2)))) > 300
    True
    """
    if isinstance(key, tuple) and len(key) == 8:
        return sys.getsizeof(key) + sum(footprint(part) for part in key[_SHARED_PARTS:])
    return footprint(key)


def footprint(obj: object) -> int:
    """sys.getsizeof of an object and of what a tuple or frozenset holds (what CPython keeps
    one copy of is free: singletons, small integers, empty and one-character bytes and str)."""
    if obj is None or obj is True or obj is False:
        return 0
    if isinstance(obj, int) and -5 <= obj <= 256:
        return 0
    if isinstance(obj, bytes | str) and len(obj) <= 1:
        return 0
    if isinstance(obj, tuple | frozenset):
        return sys.getsizeof(obj) + sum(footprint(item) for item in obj)
    return sys.getsizeof(obj)
