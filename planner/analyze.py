"""What a statement does: kind, tables read and written, functions, flags, cacheability.

The statement kind comes from its leading keywords (exact, cheap, and never fooled by a
parser fallback); tables, functions and the finer flags come from sqlglot's tree. Any
doubt makes a statement uncacheable, never an error: analyze() does not raise.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from sqlglot import exp

from .catalog import LIVE_CATALOG_PREFIXES, SIDE_EFFECTS, TIME_DEPENDENT, Catalog
from .normalize import TIME_WORDS
from .plan import Flag, Kind, SessionFacts

_WORDS = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/|\()*([A-Za-z_]+)", re.S)
_KIND_BY_WORD = {
    "select": Kind.READ, "values": Kind.READ, "table": Kind.READ, "show": Kind.READ,
    "with": Kind.READ, "explain": Kind.READ,
    "insert": Kind.WRITE, "update": Kind.WRITE, "delete": Kind.WRITE, "merge": Kind.WRITE,
    "truncate": Kind.WRITE, "copy": Kind.WRITE,
    "create": Kind.DDL, "alter": Kind.DDL, "drop": Kind.DDL, "comment": Kind.DDL, "grant": Kind.DDL,
    "revoke": Kind.DDL, "reindex": Kind.DDL, "refresh": Kind.DDL, "security": Kind.DDL,
    "import": Kind.DDL, "reassign": Kind.DDL,
    "begin": Kind.TXN, "start": Kind.TXN, "commit": Kind.TXN, "end": Kind.TXN, "rollback": Kind.TXN,
    "abort": Kind.TXN, "savepoint": Kind.TXN, "release": Kind.TXN,
    "set": Kind.SESSION, "reset": Kind.SESSION, "discard": Kind.SESSION, "listen": Kind.SESSION,
    "unlisten": Kind.SESSION, "prepare": Kind.SESSION, "deallocate": Kind.SESSION,
    "declare": Kind.SESSION, "fetch": Kind.SESSION, "move": Kind.SESSION, "close": Kind.SESSION,
    "load": Kind.SESSION,
    "vacuum": Kind.UTILITY, "analyze": Kind.UTILITY, "analyse": Kind.UTILITY, "checkpoint": Kind.UTILITY,
    "lock": Kind.UTILITY, "notify": Kind.UTILITY, "do": Kind.UTILITY, "call": Kind.UTILITY,
    "cluster": Kind.UTILITY, "execute": Kind.UNKNOWN,
}
_RANK = {Kind.READ: 0, Kind.UTILITY: 1, Kind.TXN: 2, Kind.SESSION: 3, Kind.WRITE: 4, Kind.DDL: 5,
         Kind.UNKNOWN: 6}
_WRITES = (exp.Insert, exp.Update, exp.Delete, exp.Merge)
_TIME_CLASSES = re.compile(r"^(Current|Local|Sys)\w*(Timestamp|Date|Time|Datetime)\w*$|^(Rand|Random|Uuid)$")
_EXPLAIN = re.compile(r"(?is)^\s*explain\s+(\((?P<opts>[^)]*)\)|(?P<words>(?:(?:analy[sz]e|verbose|costs|"
                      r"buffers|settings|summary|timing|wal|generic_plan|memory|serialize)\s+)*))(?P<rest>.*)$")


@dataclass(slots=True)
class Analysis:
    kind: Kind = Kind.UNKNOWN
    tables_read: set[str] = field(default_factory=set)
    tables_written: set[str] = field(default_factory=set)
    functions: set[str] = field(default_factory=set)
    flags: set[Flag] = field(default_factory=set)
    why_not: str = ""  # the first reason it is not cacheable
    parsed: bool = True

    def no_cache(self, why: str) -> None:
        if not self.why_not:
            self.why_not = why


def first_words(sql: str, n: int = 3) -> list[str]:
    words: list[str] = []
    pos = 0
    while len(words) < n:
        m = _WORDS.match(sql, pos)
        if m is None:
            break
        words.append(m.group(1).lower())
        pos = m.end()
    return words


_LEAD = re.compile(r"(?:\s+|--[^\n]*|/\*.*?\*/)*", re.S)


def statement_kind(sql: str) -> tuple[Kind, set[Flag]]:
    sql = sql[_LEAD.match(sql).end():]  # type: ignore[union-attr]  # always matches
    words = first_words(sql, 4)
    if not words:
        return Kind.UNKNOWN, set()
    kind = _KIND_BY_WORD.get(words[0], Kind.UNKNOWN)
    flags: set[Flag] = set()
    if words[0] == "copy":
        flags.add(Flag.COPY_FROM if re.search(r"(?is)\bfrom\s+(stdin|program|')", sql) else Flag.COPY_TO)
        if re.search(r"(?i)\bprogram\b", sql):
            flags.add(Flag.COPY_PROGRAM)
        if re.search(r"(?is)\b(from|to)\s+'", sql):
            flags.add(Flag.COPY_FILE)
        inner = re.match(r"(?is)\s*copy\s*\((.*)", sql)
        inner_kind = statement_kind(inner.group(1))[0] if inner else Kind.READ
        if inner_kind is not Kind.READ:
            kind = inner_kind if inner_kind in (Kind.WRITE, Kind.DDL) else Kind.UNKNOWN
            flags.add(Flag.WRITABLE_CTE)
        elif Flag.COPY_TO in flags and not flags & {Flag.COPY_PROGRAM, Flag.COPY_FILE}:
            kind = Kind.READ
    elif words[0] in ("set", "reset") and ("role" in words[1:3] or "session" in words[1:2]):
        flags.add(Flag.SET_ROLE)
    elif words[0] == "prepare" and words[1:2] == ["transaction"]:
        kind = Kind.TXN
    elif words[0] == "lock":
        flags.add(Flag.LOCKING)
    elif words[0] == "create" and any(w in ("temp", "temporary") for w in words[1:3]):
        flags.add(Flag.TEMP_TABLE)
    return kind, flags


def analyze(sql: str, statements: list[str], trees: list[exp.Expression] | None,
            facts: SessionFacts, catalog: Catalog) -> Analysis:
    """Analyse a (possibly multi-statement) text; `statements` are its statement texts and
    `trees` sqlglot's parse of it (None if sqlglot failed)."""
    out = Analysis()
    kinds: list[Kind] = []
    for text in statements:
        kind, flags = statement_kind(text)
        bare = text[_LEAD.match(text).end():]  # type: ignore[union-attr]
        m = _EXPLAIN.match(bare) if kind is Kind.READ and first_words(text, 1) == ["explain"] else None
        if m is not None:
            opts = (m.group("opts") or m.group("words") or "").lower()
            if re.search(r"\banaly[sz]e\b(?!\s+(false|off|0)\b)", opts):
                flags.add(Flag.EXPLAIN_ANALYZE)
                inner, inner_flags = statement_kind(m.group("rest"))
                flags |= inner_flags
                if inner is not Kind.READ:
                    kind = inner if inner in (Kind.WRITE, Kind.DDL) else Kind.UNKNOWN
        kinds.append(kind)
        out.flags |= flags
    if not kinds:
        out.no_cache("empty query")
        out.kind = Kind.READ
        return out
    out.kind = max(kinds, key=_RANK.__getitem__)
    if len(statements) > 1:
        out.flags.add(Flag.MULTI_STATEMENT)
        out.no_cache("several statements")
    if trees is None or len(trees) != len(statements) or any(isinstance(t, exp.Command) for t in trees):
        out.parsed = trees is not None and not any(isinstance(t, exp.Command) for t in trees)
        out.no_cache("not understood by the parser" if trees is None else "statement not analysed")
        return _finish(out, sql, kinds)
    for tree in trees:
        _walk(tree, facts, catalog, out)
    return _finish(out, sql, kinds)


def _finish(out: Analysis, sql: str, kinds: list[Kind]) -> Analysis:
    if out.kind is not Kind.READ:
        out.no_cache(f"{out.kind.value} statement")
    if any(k is not Kind.READ for k in kinds):
        return out
    if re.search(r"(?i)\bshow\b", sql[:16]):
        out.no_cache("SHOW reads session state")
    if Flag.EXPLAIN_ANALYZE in out.flags:
        out.no_cache("EXPLAIN ANALYZE executes its statement")
    for m in re.finditer(r"'((?:[^']|'')*)'", sql):
        if TIME_WORDS.search(m.group(1)):
            out.no_cache("time-dependent literal")
            break
    return out


def _name(table: exp.Table, facts: SessionFacts, catalog: Catalog, out: Analysis) -> str:
    schema = table.db
    name = table.name
    if schema:
        qualified = f"{schema}.{name}"
        if schema.startswith("pg_temp"):
            out.flags.add(Flag.TEMP_TABLE)
            out.no_cache("temporary table")
    else:
        resolved = catalog.resolve(name, facts.search_path, facts.user)
        if resolved is None:
            out.no_cache(f"unknown relation {name}")
            qualified = name
        else:
            qualified = f"{resolved}.{name}"
            if resolved == "pg_temp":
                out.flags.add(Flag.TEMP_TABLE)
                out.no_cache("temporary table")
    if qualified.startswith(("pg_catalog.", "information_schema.")):
        out.flags.add(Flag.CATALOG)
        if name.startswith(LIVE_CATALOG_PREFIXES):
            out.no_cache(f"{name} changes without DDL")
    return qualified


def _walk(tree: exp.Expression, facts: SessionFacts, catalog: Catalog, out: Analysis) -> None:
    ctes = {cte.alias_or_name for cte in tree.find_all(exp.CTE)}
    written: set[int] = set()
    for node in tree.find_all(*_WRITES):
        target = node.this
        if isinstance(target, exp.Schema):
            target = target.this
        if isinstance(target, exp.Table):
            written.add(id(target))
            out.tables_written.add(_name(target, facts, catalog, out))
        if node is not tree:
            out.flags.add(Flag.WRITABLE_CTE)
            out.kind = Kind.WRITE if _RANK[out.kind] < _RANK[Kind.WRITE] else out.kind
        if isinstance(node, exp.Update | exp.Delete) and not node.args.get("where"):
            out.flags.add(Flag.UPDATE_NO_WHERE if isinstance(node, exp.Update) else Flag.DELETE_NO_WHERE)
    if isinstance(tree, exp.TruncateTable | exp.Drop | exp.Create | exp.Alter | exp.Copy):
        targets = [tree.this] if tree.this is not None else []
        targets += tree.args.get("expressions") or [] if isinstance(tree, exp.TruncateTable) else []
        targets += tree.args.get("tables") or [] if isinstance(tree, exp.Drop) else []
        for t in targets:
            t = t.this if isinstance(t, exp.Schema) else t
            if isinstance(t, exp.Table) and not (isinstance(tree, exp.Copy) and not tree.args.get("kind")):
                written.add(id(t))
                out.tables_written.add(_name(t, facts, catalog, out))
    if isinstance(tree, exp.Select) and tree.args.get("into"):
        out.flags.add(Flag.SELECT_INTO)
        out.kind = Kind.WRITE
        for t in tree.args["into"].find_all(exp.Table):
            written.add(id(t))
            out.tables_written.add(_name(t, facts, catalog, out))
    for table in tree.find_all(exp.Table):
        if id(table) in written or (not table.db and table.name in ctes) or not table.name:
            continue
        out.tables_read.add(_name(table, facts, catalog, out))
    if tree.find(exp.Lock) is not None or tree.args.get("locks"):
        out.flags.add(Flag.LOCKING)
        out.no_cache("FOR UPDATE/SHARE")
    if isinstance(tree, exp.Select | exp.Union | exp.Intersect | exp.Except) and not tree.args.get("limit") \
            and not tree.args.get("fetch"):
        out.flags.add(Flag.UNBOUNDED_SELECT)
    _functions(tree, catalog, out)


def _functions(tree: exp.Expression, catalog: Catalog, out: Analysis) -> None:
    for fn in tree.find_all(exp.Func):
        if isinstance(fn, exp.Binary | exp.Connector | exp.Unary | exp.Predicate):
            continue
        anonymous = isinstance(fn, exp.Anonymous)
        name = fn.name.lower() if anonymous else fn.sql_name().lower()
        schema = None
        parent = fn.parent
        if anonymous and isinstance(parent, exp.Dot) and isinstance(parent.this, exp.Identifier | exp.Var):
            schema = parent.this.name.lower()
        out.functions.add(f"{schema}.{name}" if schema else name)
        if name in SIDE_EFFECTS:
            out.flags.add(Flag.SIDE_EFFECT_FUNCTION)
            out.no_cache(f"{name}() has side effects")
        elif name in TIME_DEPENDENT or _TIME_CLASSES.match(type(fn).__name__):
            out.no_cache(f"{name}() depends on the time, the session or chance")
        if not anonymous:
            continue  # a function sqlglot knows: its own name may differ from pg_proc's
        vol = catalog.volatility(name, schema)
        if vol == "v":
            out.flags.add(Flag.VOLATILE_FUNCTION)
            out.no_cache(f"{name}() is volatile")
        elif vol is None:
            out.no_cache(f"unknown function {name}()" if catalog.loaded
                         else "function volatility unknown (catalog not loaded)")
