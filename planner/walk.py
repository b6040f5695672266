"""The sqlglot tree walk: one statement's tree (of the type its keywords call for, see
sqltree.TREE_FOR) read into a Stmt: the relations it reads and writes, its function calls, its
kind when it writes through a WITH or SELECT INTO, and its flags. Names and calls are judged by
rules.Rules; the node-level rules are applied here where the walk meets the node: system and
statistics columns (rules.column_reason), FOR UPDATE / SHARE, time literals, TABLESAMPLE
without REPEATABLE, `*` over pg_class / pg_database, and whether a query is bounded
(UNBOUNDED_SELECT).

Each node class is categorized once (_categorize); the walk never enters subtrees that name
things rather than read them (_prune).
"""

from __future__ import annotations

from typing import cast

from sqlglot import exp

from .keywords import QUERY_HEADS
from .normalize import TIME_WORDS
from .plan import Flag, Kind
from .result import RANK, Stmt
from .rules import LIVE_STAR_TABLES, Rules, column_reason
from .sqltree import DML, function_name, ident, is_cte, table_parts

_RELATION_KINDS = frozenset({"TABLE", "VIEW", "SEQUENCE", "FOREIGN TABLE", "MATERIALIZED VIEW"})


def _classes(*names: str) -> tuple[type[exp.Expression], ...]:
    return tuple(c for c in (getattr(exp, n, None) for n in names) if isinstance(c, type))


# Func subclasses that are syntax or operators in Postgres, not calls of a pg_proc function.
_NOT_CALLS = _classes(
    "Binary", "Connector", "Unary", "Predicate", "Collate", "Cast", "TryCast", "Case", "If", "Coalesce",
    "Array", "Bracket", "Interval", "Struct", "Tuple", "Exists", "Paren", "Pow", "JSONExtract",
    "JSONExtractScalar", "JSONBExtract", "JSONBExtractScalar", "JSONBContains", "Greatest", "Least",
    "Nullif", "ArrayContains", "ArrayContainsAll", "ArrayOverlaps", "AtTimeZone", "Aliases", "Filter",
    "Window", "WithinGroup", "Distinct", "Any", "All",
)
_STRINGS = _classes("RawString", "ByteString", "National", "UnicodeString")


class Walker:
    """Reads one sqlglot tree (whose type matches the statement's keywords) into a Stmt."""

    def __init__(self, rules: Rules, st: Stmt) -> None:
        self.rules = rules
        self.st = st
        self.cascade = False  # DROP ... CASCADE

    def run(self, tree: exp.Expression) -> None:
        st = self.st
        targets: list[tuple[exp.Table, bool, bool, str]] = []  # (table, create, temp, write op)
        skip: set[int] = set()  # Table nodes that are not relations read
        if isinstance(tree, exp.Create) and _kind(tree) in ("FUNCTION", "PROCEDURE"):
            return  # the body is not run; its name is not a relation
        self._targets(tree, targets, skip)
        tables: list[exp.Table] = []
        funcs: list[exp.Func] = []
        selects_into: list[exp.Select] = []
        star = False
        for node in tree.walk(prune=_prune):
            cat = _CATEGORY.get(type(node))
            if cat is None:
                cat = _categorize(type(node))
            if cat == _OTHER:
                continue
            if cat == _TABLE:
                if not (node.arg_key == "expression" and isinstance(node.parent, exp.Opclass)):
                    tables.append(cast(exp.Table, node))  # (gin (col jsonb_path_ops): an opclass)
            elif cat == _CALL:
                funcs.append(cast(exp.Func, node))
            elif cat == _WRITE:
                if not isinstance(node.parent, exp.When):  # MERGE ... THEN UPDATE / INSERT
                    self._dml(cast(exp.Expression, node), tree, targets)
            elif cat == _LOCK:
                st.flags.add(Flag.LOCKING)
                st.no_cache("FOR UPDATE / FOR SHARE")
            elif cat == _COLUMN:
                why = column_reason(ident(node.this))
                if why:
                    st.no_cache(why)
                elif isinstance(node.this, exp.Star):
                    star = True
            elif cat == _STAR:
                if isinstance(node.parent, exp.Select):
                    star = True
            elif cat == _STRING:
                text = str(node.this)
                if (not isinstance(node, exp.Literal) or node.is_string) and TIME_WORDS.search(text):
                    st.no_cache("time-dependent literal")
            elif cat == _SELECT:
                if node.args.get("into") is not None:
                    selects_into.append(cast(exp.Select, node))
            elif cat == _SAMPLE and node.args.get("seed") is None:
                st.no_cache("TABLESAMPLE without REPEATABLE is random")
        for select in selects_into:
            into = select.args["into"]
            if isinstance(into.this, exp.Table):
                st.kind = Kind.WRITE
                st.flags.add(Flag.SELECT_INTO)
                temp = bool(into.args.get("temporary"))
                targets.append((into.this, True, temp, "insert"))
        written = {id(t[0]) for t in targets}
        for table, create, temp, op in targets:
            parts = table_parts(table)
            if parts is not None:
                self.rules.rels([parts], st.writes, st, create=create, temp=temp, op=op)
        if self.cascade:  # DROP ... CASCADE: the views built on what it drops go too
            for qualified in list(st.writes):
                st.writes |= self.rules.catalog.dependent_views(qualified)
        for table in tables:
            if id(table) in written or id(table) in skip:
                continue
            if not isinstance(table.this, exp.Identifier):
                continue  # a function in FROM: seen as a function
            parts = table_parts(table)
            if parts is None or (len(parts) == 1 and is_cte(table, parts[0])):
                continue
            schema = parts[-2] if len(parts) > 1 else None
            qualified = self.rules.relation(schema, parts[-1], st)
            st.reads.add(qualified)
            if "." in qualified and not qualified.startswith(("pg_catalog.", "information_schema.")):
                self.rules.read_view(qualified, st)
        if star and st.reads & LIVE_STAR_TABLES:
            st.no_cache("pg_class / pg_database statistics change without DDL")
        srf = False
        aggregates: set[int] = set()  # ids of calls of (catalog-known) aggregates
        for fn in funcs:
            srf = self._function(fn, aggregates) or srf
        if st.head in QUERY_HEADS and st.kind is Kind.READ:
            st.plain_query = True
            if isinstance(tree, exp.Select | exp.SetOperation) and not _bounded(tree, srf, aggregates):
                st.flags.add(Flag.UNBOUNDED_SELECT)

    def _targets(self, tree: exp.Expression, targets: list[tuple[exp.Table, bool, bool, str]],
                 skip: set[int]) -> None:
        """The relations a DDL / TRUNCATE statement changes, and Table nodes that name
        something else (schemas, types, indexes, functions)."""
        st = self.st
        kind = _kind(tree)
        if isinstance(tree, exp.Create):
            this = tree.this
            table = this.this if isinstance(this, exp.Schema) else this
            props = tree.args.get("properties")
            temp = Flag.TEMP_TABLE in st.flags or bool(props and props.find(exp.TemporaryProperty))
            if kind in _RELATION_KINDS and isinstance(table, exp.Table):
                targets.append((table, True, temp, "insert"))
                if temp:
                    st.flags.add(Flag.TEMP_TABLE)
            elif kind == "INDEX" and isinstance(this, exp.Index):
                on = this.args.get("table")
                if isinstance(on, exp.Table):
                    targets.append((on, False, False, "ddl"))
            elif kind == "TRIGGER":
                for trig in tree.find_all(exp.TriggerProperties) if hasattr(exp, "TriggerProperties") else ():
                    on = trig.args.get("table")
                    if isinstance(on, exp.Table):
                        targets.append((on, False, False, "ddl"))
            elif isinstance(table, exp.Table):
                skip.add(id(table))
        elif isinstance(tree, exp.Alter):
            if kind in _RELATION_KINDS and isinstance(tree.this, exp.Table):
                targets.append((tree.this, False, False, "ddl"))
            elif isinstance(tree.this, exp.Table):
                skip.add(id(tree.this))
        elif isinstance(tree, exp.Drop):
            for table in tree.args.get("tables") or []:
                if isinstance(table, exp.Table):
                    if kind in _RELATION_KINDS:
                        targets.append((table, False, False, "ddl"))
                    else:
                        skip.add(id(table))
                        if kind == "SCHEMA" and tree.args.get("cascade"):  # DROP SCHEMA s: Table(db=s)
                            self.rules.drop_schema(ident(table.this) or ident(table.args.get("db")), st)
            if tree.args.get("cascade"):
                self.cascade = True
        elif isinstance(tree, exp.TruncateTable):
            for table in tree.expressions:
                if isinstance(table, exp.Table):
                    targets.append((table, False, False, "truncate"))
        elif isinstance(tree, exp.Comment):
            this = tree.this
            if kind in _RELATION_KINDS and isinstance(this, exp.Table):
                targets.append((this, False, False, "ddl"))
            elif kind == "COLUMN" and isinstance(this, exp.Column) and this.table:
                table = exp.Table(this=this.args.get("table"), db=this.args.get("db"))
                targets.append((table, False, False, "ddl"))
            elif isinstance(this, exp.Table):
                skip.add(id(this))
        elif isinstance(tree, exp.Grant | exp.Revoke):
            securable = tree.args.get("securable")
            for table in securable if isinstance(securable, list) else [securable]:
                if isinstance(table, exp.Table):
                    if kind in ("", "TABLE", "SEQUENCE", "FOREIGN TABLE", "VIEW"):
                        targets.append((table, False, False, "ddl"))
                    else:
                        skip.add(id(table))

    def _dml(self, node: exp.Expression, root: exp.Expression,
             targets: list[tuple[exp.Table, bool, bool, str]]) -> None:
        st = self.st
        target = node.this
        if isinstance(target, exp.Schema):
            target = target.this
        if isinstance(target, exp.Table):
            targets.append((target, False, False, _write_op(node)))
        if node is not root:
            st.flags.add(Flag.WRITABLE_CTE)
            if RANK[st.kind] < RANK[Kind.WRITE]:
                st.kind = Kind.WRITE
        elif st.head == "with":
            st.kind = Kind.WRITE
        if isinstance(node, exp.Update | exp.Delete) and node.args.get("where") is None:
            st.flags.add(Flag.UPDATE_NO_WHERE if isinstance(node, exp.Update) else Flag.DELETE_NO_WHERE)

    def _function(self, fn: exp.Func, aggregates: set[int]) -> bool:
        """Note one function call; True if it returns a set (for UNBOUNDED_SELECT)."""
        st = self.st
        rules = self.rules
        if isinstance(fn, exp.Anonymous):
            name = ident(fn.this)
            if not name:
                return False
            schema: str | None = None
            parent = fn.parent
            if isinstance(parent, exp.Dot) and parent.expression is fn \
                    and isinstance(parent.this, exp.Identifier):
                schema = ident(parent.this)
            elif isinstance(parent, exp.Table) and parent.this is fn and parent.args.get("db") is not None:
                schema = ident(parent.args["db"])
            args = fn.expressions
            info = rules.function(name, schema, st, len(args), args[0] if args else None)
            if info is not None and info.aggregate:
                aggregates.add(id(fn))
            return bool(info and info.returns_set) and not isinstance(fn.parent, exp.Table)
        name = function_name(fn)
        if not name:
            return False
        if isinstance(fn, exp.AggFunc):
            aggregates.add(id(fn))
        return rules.builtin(fn, name, st) and not isinstance(fn.parent, exp.Table)


def _write_op(node: exp.Expression) -> str:
    if isinstance(node, exp.Insert):
        conflict = node.args.get("conflict")
        action = conflict.args.get("action") if isinstance(conflict, exp.OnConflict) else None
        text = str(action.this if isinstance(action, exp.Var) else action or "").upper()
        return "update" if "UPDATE" in text else "insert"  # ON CONFLICT DO UPDATE updates
    if isinstance(node, exp.Merge):
        whens = node.args.get("whens")
        actions = [w.args.get("then") for w in (whens.expressions if whens is not None else [])]
        deletes = any(isinstance(a, exp.Var) and str(a.this).upper() == "DELETE" for a in actions)
        updates = any(isinstance(a, exp.Update) for a in actions)
        return "merge" if deletes and updates else "delete" if deletes else "update" if updates else "insert"
    return {exp.Update: "update", exp.Delete: "delete"}.get(type(node), "any")


# What the tree walk does with a node, by its class (computed once per class).
_OTHER, _TABLE, _CALL, _WRITE, _LOCK, _COLUMN, _STAR, _STRING, _SELECT, _SAMPLE, _PRUNE, _DROP = range(12)
_CATEGORY: dict[type, int] = {}


def _categorize(cls: type) -> int:
    if issubclass(cls, exp.Table):
        cat = _TABLE
    elif issubclass(cls, exp.Func):
        cat = _OTHER if issubclass(cls, _NOT_CALLS) else _CALL
    elif issubclass(cls, DML):
        cat = _WRITE
    elif issubclass(cls, exp.Lock):
        cat = _LOCK
    elif issubclass(cls, exp.Column):
        cat = _COLUMN
    elif issubclass(cls, exp.Star):
        cat = _STAR
    elif issubclass(cls, (exp.Literal, *_STRINGS)):
        cat = _STRING
    elif issubclass(cls, exp.Select):
        cat = _SELECT
    elif issubclass(cls, exp.TableSample):
        cat = _SAMPLE
    elif issubclass(cls, exp.UserDefinedFunction | exp.AlterRename):
        cat = _PRUNE
    elif issubclass(cls, exp.Drop):
        cat = _DROP
    else:
        cat = _OTHER
    _CATEGORY[cls] = cat
    return cat


def _prune(node: object) -> bool:
    """Subtrees that name things rather than read them: FOR UPDATE OF t, RENAME TO t,
    function definitions, ALTER TABLE ... DROP CONSTRAINT c."""
    cat = _CATEGORY.get(type(node))
    if cat is None:
        cat = _categorize(type(node))
    if cat == _LOCK or cat == _PRUNE:
        return True
    return cat == _DROP and isinstance(node, exp.Drop) and isinstance(node.parent, exp.Alter)


def _kind(tree: exp.Expression) -> str:
    kind = tree.args.get("kind")
    text = str(kind).upper() if isinstance(kind, str) else ""
    if text == "VIEW" and (tree.args.get("materialized") or (
            isinstance(tree, exp.Create) and tree.args.get("properties") is not None
            and tree.args["properties"].find(exp.MaterializedProperty) is not None)):
        return "MATERIALIZED VIEW"
    return text


def _bounded(tree: exp.Expression, srf: bool, aggregates: set[int]) -> bool:
    """At most a known number of rows: LIMIT / FETCH, or one row (no FROM, or aggregates
    only without GROUP BY), and no set-returning function in the select list."""
    limit = tree.args.get("limit")
    if limit is not None:
        value = limit.args.get("expression") if isinstance(limit, exp.Limit) else limit
        unlimited = isinstance(value, exp.Null) or (
            isinstance(value, exp.Var) and str(value.this).upper() == "ALL")
        if not unlimited:
            return True
    if not isinstance(tree, exp.Select) or srf or tree.args.get("group") is not None:
        return False
    if tree.args.get("from_") is None and tree.args.get("from") is None:
        return True
    projections = tree.expressions
    return bool(projections) and all(
        p.find(exp.Window) is None
        and any(isinstance(n, exp.AggFunc) or id(n) in aggregates for n in p.walk())
        for p in projections)
