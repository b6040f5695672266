"""Guardrails: decide from a Plan whether a role may run a statement, and rewrite it.

Decisions use the analysed kind and flags of *every* statement of the text (so
`COMMIT; DROP TABLE t` is a DDL text) and the functions found anywhere in the tree.
Where the analysis cannot see (DO / CALL / EXECUTE bodies, text sqlglot could not parse)
the text itself is searched, and an opaque body is refused whenever a rule about
functions is on. Read-only roles are also enforced by Postgres itself: the wire door sets
`default_transaction_read_only` for them (see `session_settings`).
"""

from __future__ import annotations

import re

from .keywords import first_words
from .plan import ALLOW, Flag, Kind, Plan, Verdict
from .policy import Policy
from .statements import split

READ_ONLY = "25006"
DENIED = "42501"

_FILE_FUNCS = frozenset({"pg_read_file", "pg_read_binary_file", "pg_ls_dir", "pg_stat_file", "lo_import",
                         "lo_export", "pg_file_write", "pg_ls_logdir", "pg_ls_waldir", "pg_ls_tmpdir"})
_ADMIN_FUNCS = frozenset({"pg_terminate_backend", "pg_cancel_backend", "pg_reload_conf", "pg_rotate_logfile",
                          "pg_promote", "pg_switch_wal", "pg_create_restore_point", "pg_stat_reset",
                          "pg_stat_reset_shared", "pg_stat_reset_single_table_counters",
                          "pg_logical_emit_message", "pg_drop_replication_slot",
                          "pg_create_logical_replication_slot", "pg_create_physical_replication_slot",
                          "lo_unlink", "pg_backup_start", "pg_backup_stop"})
_FUNCTION_RULES = {"pg_sleep": lambda f: f.startswith("pg_sleep"), "file_access": _FILE_FUNCS.__contains__,
                   "dblink": lambda f: f.startswith("dblink"), "admin_functions": _ADMIN_FUNCS.__contains__}
_OPAQUE = ("do", "call", "execute")
_READ_WRITE = re.compile(r"(?i)\b(default_transaction_read_only|transaction_read_only|read\s+write)\b")
_UPDATE = re.compile(r"(?is)\bupdate\b.*\bset\b")
_DELETE = re.compile(r"(?is)\bdelete\s+from\b")
_WHERE = re.compile(r"(?i)\bwhere\b")
_SET_ROLE_FN = re.compile(r"(?i)set_config\s*\(\s*'(role|session_authorization)'")
_SET_CONFIG = re.compile(r'(?i)(?<![\w$])"?set_config"?\s*\(\s*')
_LITERAL_NAME = re.compile(r"'([A-Za-z0-9_.]+)'\s*,")
_READ_ONLY_SETTINGS = frozenset({"default_transaction_read_only", "transaction_read_only"})
# session-level advisory locks outlive the transaction (the _xact_ ones do not)
_SESSION_LOCK = re.compile(r'(?i)(?<![\w$])"?pg_(try_)?advisory_lock(_shared)?"?\s*\(')
_RESETS = (["reset", "all"], ["discard", "all"])  # back to the server's defaults, enforced ones too
_WRITE_FLAGS = {Flag.WRITABLE_CTE: "a data-modifying WITH", Flag.SELECT_INTO: "SELECT INTO",
                Flag.LOCKING: "a locking clause", Flag.COPY_FROM: "COPY FROM", Flag.SET_ROLE: "SET ROLE"}
# Functions that write (Postgres would refuse them in a read-only transaction too). Other
# side effects (advisory locks, pg_sleep) are not writes: deny rules cover those.
_WRITING_FUNCS = re.compile(r"^(nextval|setval|pg_notify|lo_(import|create|creat|put|unlink|from_bytea|"
                            r"truncate|truncate64|write)|dblink_exec|pg_logical_emit_message|"
                            r"pg_(create|drop|copy)_\w*replication_slot|pg_file_\w+)$")


def session_settings(policy: Policy | None) -> tuple[tuple[str, str], ...]:
    """(name, value) settings the wire door applies on every server connection a session of
    this role uses: Postgres itself then enforces read-only and the statement timeout."""
    if policy is None:
        return ()
    out = []
    if policy.read_only:
        out.append(("default_transaction_read_only", "on"))
    if policy.statement_timeout:
        out.append(("statement_timeout", policy.statement_timeout))
    return tuple(out)


def check(plan: Plan, policy: Policy | None) -> tuple[Verdict, str, tuple[str, ...]]:
    """The verdict for `plan` under `policy`, the SQL to run and the rewrites applied."""
    if policy is None:
        return ALLOW, plan.sql, ()
    statements = split(plan.sql)
    heads = [first_words(s, 2) for s in statements]
    verdict = _read_only(plan, policy, statements, heads) or _denied(plan, policy, heads)
    if verdict is not None:
        return verdict, plan.sql, ()
    if policy.max_rows is not None and plan.kind is Kind.READ and len(statements) == 1 and plan.parsed \
            and heads[0][:1] and heads[0][0] in ("select", "with", "values", "table") \
            and Flag.LOCKING not in plan.flags and Flag.SELECT_INTO not in plan.flags:
        if policy.max_rows_mode == "cut":  # one row more, so the wire door knows it cut
            sql = f"SELECT * FROM (\n{statements[0]}\n) AS pgsluice_rows LIMIT {policy.max_rows + 1}"
            return ALLOW, sql, (f"at most {policy.max_rows} rows, more cut with a NOTICE (max_rows)",)
        sql = f"SELECT * FROM (\n{statements[0]}\n) AS pgsluice_rows LIMIT {policy.max_rows}"
        return ALLOW, sql, (f"at most {policy.max_rows} rows (max_rows)",)
    return ALLOW, plan.sql, ()


def _reject(sqlstate: str, message: str, policy: Policy, rule: str, hint: str) -> Verdict:
    return Verdict(False, sqlstate, message, hint, rule)


def _read_only(plan: Plan, policy: Policy, statements: list[str], heads: list[list[str]]) -> Verdict | None:
    if not policy.read_only:
        return None
    hint = f"Role \"{policy.name}\" is read-only (roles.{policy.name}.read_only in the pgsluice config)."
    what = ""
    if plan.kind in (Kind.WRITE, Kind.DDL, Kind.UTILITY, Kind.UNKNOWN):
        what = {Kind.WRITE: "a write", Kind.DDL: "DDL", Kind.UTILITY: "a utility statement",
                Kind.UNKNOWN: "a statement pgsluice cannot analyse"}[plan.kind]
    for flag, name in _WRITE_FLAGS.items():
        if not what and flag in plan.flags:
            what = name
    if not what and any(_WRITING_FUNCS.match(f.rsplit(".", 1)[-1]) for f in plan.functions):
        what = "a function that writes"
    if not what and any(h[:1] and h[0] in ("set", "reset", "begin", "start") for h in heads) and \
            any(_READ_WRITE.search(s) for s in statements):
        what = "a change of the transaction's read-only mode"
    if not what and _SET_ROLE_FN.search(plan.sql):
        what = "a change of role"
    if not what and any(n is None or n in _READ_ONLY_SETTINGS for n in set_config_names(plan.sql)):
        what = "a change of the transaction's read-only mode"
    if not what and any(h[:2] in _RESETS for h in heads[:-1]):
        # alone (or last), the wire door sets the role's settings again right after it
        what = "a reset of the session's settings followed by other statements"
    if not what and _SESSION_LOCK.search(plan.sql):
        what = "a session-level advisory lock"
    if not what:
        return None
    return _reject(READ_ONLY, f"pgsluice: cannot execute {what} in a read-only session", policy,
                   "read_only", hint)


def _denied(plan: Plan, policy: Policy, heads: list[list[str]]) -> Verdict | None:
    deny = policy.deny
    rule = ""
    if "ddl" in deny and plan.kind is Kind.DDL:
        rule = "ddl"
    elif "multi_statement" in deny and Flag.MULTI_STATEMENT in plan.flags:
        rule = "multi_statement"
    elif "explain_analyze" in deny and Flag.EXPLAIN_ANALYZE in plan.flags:
        rule = "explain_analyze"
    elif "truncate" in deny and any(h[:1] == ["truncate"] for h in heads):
        rule = "truncate"
    elif "update_without_where" in deny and (Flag.UPDATE_NO_WHERE in plan.flags or (
            not plan.parsed and _UPDATE.search(plan.sql) and not _WHERE.search(plan.sql))):
        rule = "update_without_where"
    elif "delete_without_where" in deny and (Flag.DELETE_NO_WHERE in plan.flags or (
            not plan.parsed and _DELETE.search(plan.sql) and not _WHERE.search(plan.sql))):
        rule = "delete_without_where"
    elif "copy_program" in deny and Flag.COPY_PROGRAM in plan.flags:
        rule = "copy_program"
    elif ("copy_file" in deny or "file_access" in deny) and Flag.COPY_FILE in plan.flags:
        rule = "copy_file" if "copy_file" in deny else "file_access"
    elif "set_role" in deny and (Flag.SET_ROLE in plan.flags or _SET_ROLE_FN.search(plan.sql)):
        rule = "set_role"
    if not rule and policy.statement_timeout and (
            (any(h[:1] and h[0] in ("set", "reset") for h in heads)
             and re.search(r"(?i)statement_timeout", plan.sql))
            or any(h[:2] in _RESETS for h in heads[:-1])  # alone or last, it is re-applied at once
            or any(n is None or n == "statement_timeout" for n in set_config_names(plan.sql))):
        rule = "statement_timeout"
    if not rule:
        rule = _denied_function(plan, policy, heads)
    if not rule:
        return None
    return _reject(DENIED, f"pgsluice: {rule.replace('_', ' ')} is not allowed for role \"{policy.name}\"",
                   policy, rule, f"See roles.{policy.name}.deny in the pgsluice config.")


def extended_verdict(plan: Plan, policy: Policy | None) -> Verdict | None:
    """What a role's Parse may not carry though a simple Query may: RESET ALL and DISCARD ALL,
    which the wire door follows with the role's settings again only after a simple Query."""
    if policy is None or not (policy.read_only or policy.statement_timeout):
        return None
    if not any(first_words(s, 2)[:2] in _RESETS for s in split(plan.sql)):
        return None
    if policy.read_only:
        return _reject(READ_ONLY, "pgsluice: cannot execute a reset of the session's settings over the "
                       "extended protocol in a read-only session", policy, "read_only",
                       f"Role \"{policy.name}\" is read-only; send RESET ALL as a simple query.")
    return _reject(DENIED, f"pgsluice: statement timeout is not allowed for role \"{policy.name}\"", policy,
                   "statement_timeout", "Send RESET ALL as a simple query.")


def set_config_names(sql: str) -> list[str | None]:
    """The setting each set_config() call in `sql` names (lower case); None where the name is
    not a plain literal, so it cannot be told.

    >>> set_config_names("SELECT set_config('jit', 'off', false), pg_catalog.SET_CONFIG($1, 'x', true)")
    ['jit', None]
    """
    out: list[str | None] = []
    for m in _SET_CONFIG.finditer(sql):
        literal = _LITERAL_NAME.match(sql, m.end())
        out.append(literal.group(1).lower() if literal else None)
    return out


def _denied_function(plan: Plan, policy: Policy, heads: list[list[str]]) -> str:
    rules = [r for r in _FUNCTION_RULES if r in policy.deny]
    if not rules and not policy.deny_functions:
        return ""
    if any(h[:1] and h[0] in _OPAQUE for h in heads):
        return rules[0] if rules else "deny_functions"  # DO / CALL / EXECUTE: bodies unseen
    names = {f.rsplit(".", 1)[-1] for f in plan.functions}
    if not plan.parsed:  # the analysis could not see every call: look at the words of the text
        names |= {w.lower() for w in re.findall(r"[A-Za-z_][A-Za-z0-9_$]*", plan.sql)}
    for rule in rules:
        if any(_FUNCTION_RULES[rule](n) for n in names):
            return rule
    if names & policy.deny_functions:
        return "deny_functions"
    return ""
