"""What the planner knows about one query text: the Plan, and the session facts it depends on.

The rest of pgsluice (guardrails, cache, single-flight, stats) trusts these types; they
are plain frozen values, cheap to keep in the plan cache and safe to share.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .batch import Batchable
    from .reach import Reach


class Kind(StrEnum):
    """What a statement does. A multi-statement text takes the most consequential kind
    (DDL > WRITE > SESSION > TXN > UTILITY > READ; UNKNOWN if any part is unknown)."""

    READ = "read"  # SELECT / VALUES / TABLE / SHOW / EXPLAIN (without ANALYZE of a write)
    WRITE = "write"  # INSERT / UPDATE / DELETE / MERGE / COPY FROM / TRUNCATE / SELECT INTO ...
    DDL = "ddl"  # CREATE / ALTER / DROP / COMMENT / GRANT / REVOKE / REINDEX ...
    TXN = "txn"  # BEGIN / START / COMMIT / ROLLBACK / SAVEPOINT / RELEASE / PREPARE TRANSACTION
    SESSION = "session"  # SET / RESET / DISCARD / LISTEN / UNLISTEN / PREPARE / DEALLOCATE / DECLARE
    UTILITY = "utility"  # VACUUM / ANALYZE / CHECKPOINT / LOCK / NOTIFY / DO / CALL / LOAD ...
    UNKNOWN = "unknown"  # could not be parsed: passes through unchanged, never cached


class Flag(StrEnum):
    """Facts guardrails and the cache need that `Kind` alone does not carry."""

    MULTI_STATEMENT = "multi_statement"
    WRITABLE_CTE = "writable_cte"  # WITH d AS (DELETE ...) SELECT ...
    SELECT_INTO = "select_into"
    LOCKING = "locking"  # FOR UPDATE / SHARE / NO KEY UPDATE / KEY SHARE, LOCK TABLE
    TEMP_TABLE = "temp_table"  # creates or reads a temporary table
    UPDATE_NO_WHERE = "update_no_where"
    DELETE_NO_WHERE = "delete_no_where"
    COPY_PROGRAM = "copy_program"  # COPY ... TO/FROM PROGRAM
    COPY_FILE = "copy_file"  # COPY ... TO/FROM 'server file'
    COPY_TO = "copy_to"  # COPY ... TO STDOUT (a read)
    COPY_FROM = "copy_from"  # COPY ... FROM STDIN (a write)
    SET_ROLE = "set_role"  # SET ROLE / SET SESSION AUTHORIZATION / RESET ROLE ...
    EXPLAIN_ANALYZE = "explain_analyze"  # executes its statement
    UNBOUNDED_SELECT = "unbounded_select"  # top-level SELECT without LIMIT/FETCH (max_rows)
    CATALOG = "catalog"  # reads pg_catalog / information_schema
    VOLATILE_FUNCTION = "volatile_function"
    SIDE_EFFECT_FUNCTION = "side_effect_function"  # e.g. pg_sleep, nextval, setval, lo_import, dblink
    DANGEROUS_FUNCTION = "dangerous_function"  # pg_read_file, lo_import, dblink, pg_terminate_backend ...


@dataclass(frozen=True, slots=True)
class SessionFacts:
    """The session state a Plan depends on; part of the plan-cache key."""

    database: str = "postgres"
    user: str = "postgres"
    search_path: tuple[str, ...] = ("$user", "public")
    role_policy: str = ""  # name of the guardrail policy in force ("" = none)


@dataclass(frozen=True, slots=True)
class Verdict:
    """Guardrail outcome: allowed (maybe rewritten) or rejected with a Postgres error."""

    allowed: bool = True
    sqlstate: str = ""
    message: str = ""
    hint: str = ""
    rule: str = ""  # which rule decided, for stats and `explain`


ALLOW = Verdict()


@dataclass(frozen=True, slots=True)
class Plan:
    kind: Kind
    sql: str  # the SQL to run after rewrites (the original text when nothing was rewritten)
    fingerprint: str = ""  # hex digest of `canonical`; "" when the text could not be parsed
    canonical: str = ""  # canonical SQL, literals replaced by $n placeholders (n > any own $n)
    params: tuple[str, ...] = ()  # the lifted literal values, as canonical SQL literals
    tables_read: frozenset[str] = frozenset()  # "schema.table", resolved through search_path
    tables_written: frozenset[str] = frozenset()
    functions: frozenset[str] = frozenset()  # "schema.name" when known, else "name"
    flags: frozenset[Flag] = frozenset()
    cacheable: bool = False
    why_not: str = ""  # the first reason it is not cacheable ("" when cacheable)
    statements: int = 1
    parsed: bool = True  # False: sqlglot could not parse; passed through unchanged
    rewrites: tuple[str, ...] = ()  # human-readable rewrites applied (e.g. "LIMIT 1000 added")
    verdict: Verdict = ALLOW
    hints: tuple[tuple[str, str], ...] = field(default=())  # from comments: agent=..., max_staleness=...
    # per table, the columns and key values read or written (reach.py); None: not worked out
    reach: Reach | None = field(default=None, compare=False)
    # burst batching (batch.py): what reads of this shape may be merged on, or why not
    batch: Batchable | None = field(default=None, compare=False)
    why_not_batch: str = field(default="", compare=False)

    def hint(self, name: str) -> str | None:
        for key, value in self.hints:
            if key == name:
                return value
        return None
