"""Facts from Postgres's catalog the planner decides with: function volatility and which
schema holds a relation. Loaded with asyncpg at start and refreshed after DDL."""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from dataclasses import dataclass, field

import asyncpg

# Stable or immutable in pg_proc, yet their answer moves with the clock, the session or
# the server's activity: never cacheable.
TIME_DEPENDENT = frozenset({
    "now", "statement_timestamp", "transaction_timestamp", "clock_timestamp", "timeofday",
    "age", "current_setting", "localtime", "localtimestamp", "current_timestamp", "current_date",
    "current_time", "to_timestamp", "inet_client_addr", "inet_client_port", "pg_backend_pid",
    "pg_conf_load_time", "pg_postmaster_start_time", "txid_current", "txid_current_if_assigned",
    "txid_current_snapshot", "pg_current_xact_id", "pg_current_snapshot", "pg_current_wal_lsn",
})
# Functions with effects beyond their result (guardrails name them; never cacheable).
SIDE_EFFECTS = frozenset({
    "nextval", "setval", "currval", "lastval", "setseed", "random", "pg_sleep", "pg_sleep_for",
    "pg_sleep_until", "pg_notify", "set_config", "pg_advisory_lock", "pg_advisory_xact_lock",
    "pg_advisory_lock_shared", "pg_try_advisory_lock", "pg_advisory_unlock", "pg_advisory_unlock_all",
    "pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile",
    "pg_promote", "pg_switch_wal", "pg_create_restore_point", "pg_read_file", "pg_read_binary_file",
    "pg_ls_dir", "pg_stat_file", "lo_import", "lo_export", "lo_unlink", "lo_create", "lo_put",
    "dblink", "dblink_exec", "dblink_connect", "dblink_send_query", "pg_logical_emit_message",
    "pg_stat_reset", "pg_create_logical_replication_slot", "pg_drop_replication_slot",
})
# pg_catalog relations whose rows change without DDL: never cacheable.
LIVE_CATALOG_PREFIXES = ("pg_stat", "pg_locks", "pg_settings", "pg_file_settings", "pg_cursors",
                         "pg_prepared", "pg_replication", "pg_backend_memory", "pg_shmem",
                         "pg_timezone", "pg_config", "pg_wait_events", "pg_aios", "pg_hba",
                         "pg_ident", "pg_available", "pg_largeobject", "pg_sequence",
                         "pg_subscription_rel", "pg_user_mappings")

_generations = itertools.count(1)

_FUNCTIONS = """
SELECT n.nspname, p.proname, max(p.provolatile) AS vol  -- 'v' > 's' > 'i'
FROM pg_catalog.pg_proc p JOIN pg_catalog.pg_namespace n ON n.oid = p.pronamespace
GROUP BY 1, 2
"""
_RELATIONS = """
SELECT n.nspname, c.relname, c.relkind, c.relpersistence
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'v', 'm', 'p', 'f')
"""


@dataclass(frozen=True, slots=True)
class Catalog:
    """What Postgres said, frozen: an empty Catalog means "nothing known"."""

    functions: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> schema -> i/s/v
    relations: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> schema -> persistence
    generation: int = 0

    @property
    def loaded(self) -> bool:
        return bool(self.functions)

    def volatility(self, name: str, schema: str | None = None) -> str | None:
        """'i', 's' or 'v' (the most volatile overload), or None if unknown."""
        by_schema = self.functions.get(name)
        if not by_schema:
            return None
        if schema is not None:
            return by_schema.get(schema)
        return max(by_schema.values())

    def resolve(self, name: str, search_path: Iterable[str], user: str) -> str | None:
        """The schema a relation name resolves to, as Postgres would: pg_temp first for
        relations, then pg_catalog unless listed, then the search_path; None if nowhere."""
        by_schema = self.relations.get(name)
        if not by_schema:
            return None
        path = [user if s == "$user" else s for s in search_path]
        if "pg_temp" not in path:
            path.insert(0, "pg_temp")
        if "pg_catalog" not in path:
            path.insert(1, "pg_catalog")
        for schema in path:
            if schema == "pg_temp":
                if any(s.startswith("pg_temp_") for s in by_schema):
                    return "pg_temp"
            elif schema in by_schema:
                return schema
        return None


async def load(conn: asyncpg.Connection) -> Catalog:
    functions: dict[str, dict[str, str]] = {}
    for schema, name, vol in await conn.fetch(_FUNCTIONS):
        functions.setdefault(name, {})[schema] = vol
    relations: dict[str, dict[str, str]] = {}
    for schema, name, _kind, persistence in await conn.fetch(_RELATIONS):
        relations.setdefault(name, {})[schema] = persistence
    return Catalog(functions, relations, next(_generations))
