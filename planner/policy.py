"""Guardrail policies per agent role, from the TOML config:

    [pgsluice.roles.analyst]
    match_users = ["analyst_*"]            # glob patterns; also match_application_names
    read_only = true
    max_rows = 1000
    max_rows_mode = "limit"                # reads run as SELECT * FROM (...) LIMIT n; or "cut":
                                           # any result is cut at n rows, with a NOTICE
    deny = ["pg_sleep", "file_access", "dblink", "set_role", "admin_functions"]
    deny_functions = ["my_expensive_fn"]
    statement_timeout = "5s"

The first role (in file order) whose patterns match a session applies; a role named
`default` applies to sessions no other role matches.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

RULES = frozenset({
    "ddl", "update_without_where", "delete_without_where", "truncate", "pg_sleep", "copy_program",
    "copy_file", "file_access", "dblink", "set_role", "admin_functions", "multi_statement",
    "explain_analyze",
})
_TIMEOUT = re.compile(r"^\s*\d+(\.\d+)?\s*(us|ms|s|min|h|d)?\s*$")
_KEYS = frozenset({"match_users", "match_application_names", "read_only", "max_rows", "max_rows_mode",
                   "deny", "deny_functions", "statement_timeout"})


class PolicyError(ValueError):
    pass


@dataclass(frozen=True, slots=True)
class Policy:
    name: str
    read_only: bool = False
    max_rows: int | None = None
    max_rows_mode: str = "limit"
    deny: frozenset[str] = frozenset()
    deny_functions: frozenset[str] = frozenset()
    statement_timeout: str | None = None
    match_users: tuple[str, ...] = ()
    match_application_names: tuple[str, ...] = ()

    def matches(self, user: str, application_name: str) -> bool:
        return any(fnmatch.fnmatchcase(user, p) for p in self.match_users) or \
            any(fnmatch.fnmatchcase(application_name, p) for p in self.match_application_names)


def _strings(name: str, key: str, value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise PolicyError(f"roles.{name}.{key} must be a list of strings")
    return tuple(value)


def policy_from_table(name: str, table: Mapping[str, Any]) -> Policy:
    unknown = set(table) - _KEYS
    if unknown:
        raise PolicyError(f"roles.{name}: unknown setting {sorted(unknown)[0]!r}")
    read_only = table.get("read_only", False)
    if not isinstance(read_only, bool):
        raise PolicyError(f"roles.{name}.read_only must be true or false")
    max_rows = table.get("max_rows")
    if max_rows is not None and (not isinstance(max_rows, int) or isinstance(max_rows, bool) or max_rows < 1):
        raise PolicyError(f"roles.{name}.max_rows must be a positive integer")
    mode = table.get("max_rows_mode", "limit")
    if mode not in ("limit", "cut"):
        raise PolicyError(f"roles.{name}.max_rows_mode must be \"limit\" or \"cut\"")
    deny = _strings(name, "deny", table.get("deny", []))
    bad = [r for r in deny if r not in RULES]
    if bad:
        raise PolicyError(f"roles.{name}.deny: unknown rule {bad[0]!r} (known: {', '.join(sorted(RULES))})")
    timeout = table.get("statement_timeout")
    if timeout is not None and (not isinstance(timeout, str) or not _TIMEOUT.match(timeout)):
        raise PolicyError(f"roles.{name}.statement_timeout must be a duration like \"5s\" or \"250ms\"")
    return Policy(
        name=name, read_only=read_only, max_rows=max_rows, max_rows_mode=mode, deny=frozenset(deny),
        deny_functions=frozenset(f.lower() for f in _strings(name, "deny_functions",
                                                             table.get("deny_functions", []))),
        statement_timeout=timeout.strip() if timeout else None,
        match_users=_strings(name, "match_users", table.get("match_users", [])),
        match_application_names=_strings(name, "match_application_names",
                                         table.get("match_application_names", [])),
    )  # fmt: skip


@dataclass(frozen=True, slots=True)
class Policies:
    roles: tuple[Policy, ...] = ()

    @classmethod
    def from_toml(cls, table: Mapping[str, Any]) -> Policies:
        if not isinstance(table, Mapping):
            raise PolicyError("roles must be a table of tables: [pgsluice.roles.NAME]")
        roles = []
        for name, body in table.items():
            if not isinstance(body, Mapping):
                raise PolicyError(f"roles.{name} must be a table")
            roles.append(policy_from_table(name, body))
        return cls(tuple(roles))

    def for_session(self, user: str, application_name: str) -> Policy | None:
        """Chosen at login from the user and application_name, which the session cannot
        change later (a comment tag never picks a policy: it could pick a laxer one)."""
        default = None
        for role in self.roles:
            if role.name == "default":
                default = role
            elif role.matches(user, application_name):
                return role
        return default
