"""What a statement does: kind, tables read and written, functions called, flags, and whether
its result may be cached.

    analysis = analyze_statements(sql, facts, catalog)            # parses with sqlglot
    analysis = analyze_statements(sql, facts, catalog, trees)     # reuses a parse (one tree per statement)

Each statement of the text is classified twice. Its leading keywords give the kind (exact,
cheap, and never fooled by sqlglot's fallbacks: it parses `LISTEN ch` as a column alias and
much of Postgres's utility syntax as an opaque `Command`). sqlglot's tree, used only when it
has the type the keywords call for, gives the tables, functions and finer flags. Statements
without such a tree are read token by token (EXPLAIN, COPY, DECLARE, PREPARE, VACUUM, LOCK,
SET ROLE, CREATE ... AS, ...); what still cannot be read is `parsed=False` and uncacheable.
A text's kind is that of its most consequential statement (Kind's docstring).

Tables are "schema.name", resolved through the catalog and the search_path (a SET search_path
earlier in the same text counts; so does a relation created earlier in it); a name that does
not resolve is reported bare and makes the text uncacheable. CTE names are not tables (with
Postgres's scoping: a WITH query sees the ones before it, or all of them if RECURSIVE). A user
view is read through (its base tables are read too; its definition's functions count as the
query's); a materialized view is not (REFRESH reads its tables). A write lists what it can
change through partitions, inheritance and cascading foreign keys (catalog.also_written), and
DROP ... CASCADE the views it drops. Maintenance (VACUUM, ANALYZE, CLUSTER, LOCK, REINDEX)
reads its tables; plain EXPLAIN and PREPARE read what their statement names; EXPLAIN ANALYZE
and DECLARE (run on FETCH) carry their statement's effects.

Cacheable means: one statement, kind READ, fully parsed, a plain query (SELECT, VALUES, TABLE,
WITH ... SELECT), and none of these (`why_not` names the first found):
  * a relation that is unknown, temporary (in any session), a sequence, a foreign table, has
    row-level security, or is a pg_catalog relation that changes without DDL (pg_stat*,
    pg_locks, pg_settings, ...); pg_class / pg_database statistics columns (reltuples, ...);
  * a function that is volatile (any overload, in any schema on the path), unknown (or the
    catalog is not loaded), a stable user-defined one (it may read tables), time-dependent
    (now(), CURRENT_DATE, clock_timestamp(), age(x), ...), session- or server-dependent
    (current_setting(), pg_backend_pid(), txid_current(), pg_stat_get_*, ...), or with side
    effects (nextval(), pg_sleep(), pg_advisory_*, lo_*, dblink*, set_config(), ...);
  * a string literal naming a moment ('now', 'today', 'tomorrow', 'yesterday');
  * a system column (xmin, xmax, cmin, cmax, ctid: they change without a logical write);
  * FOR UPDATE / SHARE, SELECT INTO, data-modifying WITH, TABLESAMPLE without REPEATABLE;
  * a view whose definition fails any of the above.
Not reasons: CURRENT_USER / SESSION_USER / current_schema() / current_database() and the
search_path (all part of the plan-cache key); pg_catalog and information_schema reads
(flagged CATALOG: their rows change only with DDL); stable built-ins such as to_char or
date_trunc (session settings other than search_path are taken as fixed).

`analyze_statements` never raises: any unexpected error gives an UNKNOWN, unparsed,
uncacheable analysis.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from itertools import islice
from typing import cast

from sqlglot import exp

from .catalog import (
    SIDE_EFFECTS,
    SYSTEM_SCHEMAS,
    TIME_DEPENDENT,
    Catalog,
    Function,
    Relation,
    builtin_hazard,
    live_catalog,
)
from .keywords import (
    KEYWORD_GRAMMAR,
    KIND_BY_HEAD,
    QUERY_HEADS,
    Tok,
    first_words,
    head_words,
    is_punct,
    is_word,
    matching,
    read_name,
    read_names,
    search_path_change,
    tokens,
)
from .normalize import TIME_WORDS
from .plan import Flag, Kind, SessionFacts
from .result import RANK, Analysis, Stmt
from .sqltree import DML, MAX_PARSE, TREE_FOR, function_name, ident, is_cte, parse_trees, table_parts
from .statements import split

__all__ = ["SIDE_EFFECTS", "TIME_DEPENDENT", "Analysis", "analyze", "analyze_statements", "first_words",
           "statement_kind", "tokens"]

logging.getLogger("sqlglot").setLevel(logging.ERROR)  # it warns on every fallback to Command

_HUGE_TOKENS = 4096
_DO_UPDATE = re.compile(r"(?i)\bdo\s+update\b")
_WHERE_WORD = re.compile(r"(?i)\bwhere\b")
_LOCKING_WORDS = re.compile(r"(?i)\bfor\s+(?:update|share|no\s+key\s+update|key\s+share)\b")
_DML_WORDS = re.compile(r"(?i)\b(?:insert|update|delete|merge)\b")
_INTO_WORD = re.compile(r"(?i)\binto\b")
_WITH_DATA = re.compile(r"(?is)\bwith\s+(?:no\s+)?data\s*;?\s*$")
_RELATION_KINDS = frozenset({"TABLE", "VIEW", "SEQUENCE", "FOREIGN TABLE", "MATERIALIZED VIEW"})
_SYSTEM_COLUMNS = frozenset({"xmin", "xmax", "cmin", "cmax", "ctid"})
# pg_class / pg_database columns that VACUUM, ANALYZE and autovacuum change without DDL.
_LIVE_CATALOG_COLUMNS = frozenset({"reltuples", "relpages", "relallvisible", "relallfrozen", "relfrozenxid",
                                   "relminmxid", "datfrozenxid", "datminmxid"})
_LIVE_STAR_TABLES = frozenset({"pg_catalog.pg_class", "pg_catalog.pg_database"})
_TIME_CLASS = re.compile(r"^(Current|Local|Sys)\w*(Timestamp|Date|Time|Datetime)\w*$")
_VOLATILE_CLASSES = frozenset({"Rand", "Random", "Uuid", "RandomUuid", "Randn"})
_SRF_CLASSES = frozenset({"Explode", "ExplodingGenerateSeries", "GenerateSeries", "Unnest", "Posexplode"})


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


# ---- analysis -------------------------------------------------------------------------------------


def analyze_statements(sql: str, facts: SessionFacts, catalog: Catalog,
                       expressions: Sequence[exp.Expression | None] | None = None,
                       statements: Sequence[str] | None = None) -> Analysis:
    """Analyse a (possibly multi-statement) text. `expressions`: sqlglot's parse of it (one
    tree per statement, e.g. the canonicalizer's), reused when it matches the statements;
    `statements`: the statement texts if already split. Never raises."""
    try:
        return _Analyzer(facts, catalog).text(sql, expressions, statements)
    except Exception as err:  # a bug here must not break the proxy
        out = Analysis(kind=Kind.UNKNOWN, parsed=False, why_not=f"analysis failed ({type(err).__name__})")
        try:
            kinds = [statement_kind(s)[0] for s in split(sql)]
            out.kind = max(kinds, key=RANK.__getitem__) if kinds else Kind.UNKNOWN
            out.statements = len(kinds)
            out.kinds = kinds
        except Exception:
            pass
        return out


def analyze(sql: str, statements: list[str], trees: list[exp.Expression] | None,
            facts: SessionFacts, catalog: Catalog) -> Analysis:
    """Planner entry point: `statements` are the text's statements (planner.statements.split)
    and `trees` sqlglot's parse of the whole text (None if sqlglot failed)."""
    return analyze_statements(sql, facts, catalog, trees, statements)


def statement_kind(sql: str) -> tuple[Kind, set[Flag]]:
    """Kind and flags of one statement from its keywords alone (no catalog, no parse)."""
    try:
        st = _Analyzer(SessionFacts(), Catalog()).statement(sql, None)
    except Exception:
        return Kind.UNKNOWN, set()
    return st.kind, st.flags



class _Analyzer:
    def __init__(self, facts: SessionFacts, catalog: Catalog) -> None:
        self.facts = facts
        self.catalog = catalog
        self.path = facts.search_path
        self.user = facts.user
        self.created: dict[str, str] = {}  # relations created by earlier statements of the text

    # ---- the text ----

    def text(self, sql: str, expressions: Sequence[exp.Expression | None] | None,
             statements: Sequence[str] | None) -> Analysis:
        if statements is None:
            try:
                statements = split(sql)
            except Exception:
                statements = [sql] if sql.strip() else []
        trees: list[exp.Expression | None]
        given = [t for t in expressions if t is not None] if expressions is not None else None
        if given is not None and len(given) == len(statements):
            trees = list(given)
        else:
            trees = [None] * len(statements)
            for i, text in enumerate(statements):
                if len(sql) > MAX_PARSE:  # a huge text (a dump, a bulk load): keywords only
                    break
                parsed = parse_trees(text) if self._wants_tree(text) else None
                trees[i] = parsed[0] if parsed is not None and len(parsed) == 1 else None
        out = Analysis(statements=len(statements))
        results = []
        for text, tree in zip(statements, trees, strict=True):
            st = self.statement(text, tree)
            results.append(st)
            if st.head in ("set", "reset") and len(statements) > 1:
                path = search_path_change(text)
                if path is not None:  # later statements of the text resolve names with it
                    self.path = path or self.facts.search_path
        for st in results:
            out.kinds.append(st.kind)
            out.tables_read |= st.reads
            out.tables_written |= st.writes
            out.functions |= st.functions
            out.flags |= st.flags
            out.parsed = out.parsed and st.parsed
        out.kind = max(out.kinds, key=RANK.__getitem__) if out.kinds else Kind.READ
        if len(results) > 1:
            out.flags.add(Flag.MULTI_STATEMENT)
            out.flags.discard(Flag.UNBOUNDED_SELECT)
        self._finish(out, results)
        return out

    @staticmethod
    def _wants_tree(text: str) -> bool:
        words = first_words(text, 1)
        return bool(words) and words[0] in TREE_FOR

    @staticmethod
    def _finish(out: Analysis, results: list[Stmt]) -> None:
        """Cacheability: the statement-level reasons first, then the details."""
        if not results:
            out.no_cache("empty query")
            return
        if len(results) > 1:
            out.no_cache("several statements")
        st = results[0]
        if not out.parsed:
            out.no_cache("not understood by the parser")
        if out.kind is not Kind.READ:
            out.no_cache(f"{out.kind.value} statement")
        if st.note:
            out.no_cache(st.note)
        if not st.plain_query:
            out.no_cache("not a plain query")
        for r in results:
            if r.why:
                out.no_cache(r.why)

    # ---- one statement ----

    def statement(self, text: str, tree: exp.Expression | None) -> Stmt:
        head_toks = head_words(text)
        if not head_toks:
            return Stmt(Kind.UNKNOWN, parsed=False, why="no statement keyword")
        head = head_toks[0].value
        words = [t.value for t in head_toks]
        st = Stmt(KIND_BY_HEAD.get(head, Kind.UNKNOWN), head)
        expected = TREE_FOR.get(head)
        if expected is not None and tree is not None and isinstance(tree, expected) \
                and not isinstance(tree, exp.Command):
            if head == "create" and any(w in ("temp", "temporary") for w in words[1:4]):
                st.flags.add(Flag.TEMP_TABLE)
            _Walker(self, st).run(tree)
            return st
        self._keywords(text, words, st)
        return st

    def _keywords(self, text: str, words: list[str], st: Stmt) -> None:
        """A statement without a usable sqlglot tree, read from its tokens."""
        head = st.head
        st.parsed = head in KEYWORD_GRAMMAR
        toks: list[Tok] | None = None

        huge = len(text) > MAX_PARSE

        def all_tokens() -> list[Tok]:
            nonlocal toks
            if toks is None:  # of a huge text, the beginning: enough for its keywords and names
                toks = list(islice(tokens(text), _HUGE_TOKENS) if huge else tokens(text))
            return toks

        if head in ("set", "reset"):
            rest = words[1:]
            if rest[:1] in (["session"], ["local"]) and rest[1:2] != ["authorization"]:
                rest = rest[1:]
            if rest[:1] in (["role"], ["session_authorization"]) or rest[:2] == ["session", "authorization"]:
                st.flags.add(Flag.SET_ROLE)
        elif head == "show":
            st.note = "SHOW reads session state"
        elif head in ("prepare", "commit", "rollback") and words[1:2] in (["transaction"], ["prepared"]):
            st.kind = Kind.TXN
            st.parsed = True
        elif head == "lock":
            st.flags.add(Flag.LOCKING)
            t = all_tokens()
            i = 2 if is_word(t, 1, "table") else 1
            self._rels(read_names(t, i, frozenset({"in", "nowait"}))[0], st.reads, st)
        elif head in ("vacuum", "analyze", "analyse", "cluster"):
            t = all_tokens()
            i = 1
            if is_punct(t, i, "("):
                i = matching(t, i)
            while is_word(t, i, "full", "freeze", "verbose", "analyze", "analyse", "skip_locked"):
                i += 1
            self._rels(read_names(t, i, frozenset({"using"}))[0], st.reads, st)
        elif head == "reindex":
            t = all_tokens()
            i = 1
            if is_punct(t, i, "("):
                i = matching(t, i)
            if is_word(t, i, "table"):
                i += 2 if is_word(t, i + 1, "concurrently") else 1
                self._rels(read_names(t, i)[0][:1], st.reads, st)
        elif head == "refresh":
            t = all_tokens()
            i = 3 + (1 if is_word(t, 3, "concurrently") else 0)
            self._rels(read_names(t, i)[0][:1], st.writes, st, op="ddl")
            for qualified in list(st.writes):  # it runs the view's query: that reads its tables
                view = self.catalog.view(qualified)
                if view is not None:
                    st.reads |= view.relations
        elif head == "explain":
            self._explain(text, all_tokens(), st)
        elif head == "copy":
            self._copy(text, all_tokens(), st)
        elif head == "declare":
            self._declare(text, all_tokens(), st)
        elif head == "prepare":
            self._prepare(text, all_tokens(), st)
        elif head == "call":
            t = all_tokens()
            parts, _ = read_name(t, 1)
            if parts:
                self._call(parts, st)
        elif head in ("create", "alter", "drop", "grant", "revoke", "comment", "truncate"):
            self._ddl(text, all_tokens(), st)
            self._scan_calls(all_tokens(), st)
        elif head in ("select", "values", "table", "with", "insert", "update", "delete", "merge"):
            if huge:
                self._huge_dml(text, all_tokens(), st)
            else:
                self._dml(all_tokens(), st)
                self._scan_calls(all_tokens(), st)
        elif head in ("do",):
            st.no_cache("DO body not analysed")
        if not st.parsed:
            st.no_cache("not understood by the parser")

    # ---- statements that wrap another ----

    def _inner(self, text: str, start: int) -> Stmt:
        inner_text = text[start:]
        parsed = parse_trees(inner_text) if self._wants_tree(inner_text) else None
        tree = parsed[0] if parsed is not None and len(parsed) == 1 else None
        return self.statement(inner_text, tree)

    def _explain(self, text: str, toks: list[Tok], st: Stmt) -> None:
        analyze = False
        i = 1
        if is_punct(toks, i, "("):
            end = matching(toks, i)
            option: list[Tok] = []
            for tok in [*toks[i + 1:end - 1], Tok("p", ",", 0, 0)]:
                if tok.kind == "p" and tok.value == ",":
                    if option and option[0].kind == "w" and option[0].value in ("analyze", "analyse"):
                        value = option[1].value.strip("'").lower() if len(option) > 1 else "true"
                        analyze = value not in ("false", "off", "0", "no")
                    option = []
                else:
                    option.append(tok)
            i = end
        else:
            while is_word(toks, i, "analyze", "analyse", "verbose"):
                analyze = analyze or toks[i].value != "verbose"
                i += 1
        st.note = "EXPLAIN ANALYZE executes its statement" if analyze else \
            "EXPLAIN output depends on planner statistics"
        if i >= len(toks):
            st.parsed = False
            return
        inner = self._inner(text, toks[i].start)
        st.parsed = inner.parsed
        st.functions |= inner.functions
        if analyze:
            st.flags.add(Flag.EXPLAIN_ANALYZE)
            st.kind = inner.kind if inner.kind in (Kind.READ, Kind.WRITE, Kind.DDL) else Kind.UNKNOWN
            st.reads |= inner.reads
            st.writes |= inner.writes
            st.flags |= inner.flags - {Flag.UNBOUNDED_SELECT}
        else:  # planned, not run: everything it names is only read (for its statistics)
            st.reads |= inner.reads | inner.writes
            st.flags |= inner.flags & {Flag.CATALOG, Flag.TEMP_TABLE}

    def _copy(self, text: str, toks: list[Tok], st: Stmt) -> None:
        st.note = "COPY uses the copy sub-protocol"
        i = 1
        inner: Stmt | None = None
        target: list[str] | None = None
        if is_punct(toks, i, "("):
            end = matching(toks, i)
            inner_text = text[toks[i].end:toks[end - 1].start] if end - 1 > i else ""
            parsed = parse_trees(inner_text) if self._wants_tree(inner_text) else None
            inner = self.statement(inner_text, parsed[0] if parsed and len(parsed) == 1 else None)
            i = end
        else:
            if is_word(toks, i, "binary"):  # pre-7.3 syntax
                i += 1
            target, i = read_name(toks, i)
            if is_punct(toks, i, "("):
                i = matching(toks, i)
        direction = toks[i].value if is_word(toks, i, "from", "to") else ""
        where = toks[i + 1] if i + 1 < len(toks) else None
        st.parsed = direction != "" and where is not None and (target is not None or inner is not None) \
            and (inner is None or inner.parsed)
        program = where is not None and where.kind == "w" and where.value == "program"
        to_file = where is not None and where.kind == "s"
        if program:
            st.flags.add(Flag.COPY_PROGRAM)
        if to_file:
            st.flags.add(Flag.COPY_FILE)
        if direction == "from":
            st.kind = Kind.WRITE
            st.flags.add(Flag.COPY_FROM)
            if target is not None:
                self._rels([target], st.writes, st, op="insert")
        else:
            st.flags.add(Flag.COPY_TO)
            st.kind = Kind.WRITE if program or to_file else Kind.READ
            if target is not None:
                self._rels([target], st.reads, st)
        if inner is not None:
            st.reads |= inner.reads
            st.writes |= inner.writes
            st.functions |= inner.functions
            st.flags |= inner.flags - {Flag.UNBOUNDED_SELECT}
            if inner.kind is not Kind.READ:
                st.kind = inner.kind if inner.kind in (Kind.WRITE, Kind.DDL) else Kind.UNKNOWN

    def _declare(self, text: str, toks: list[Tok], st: Stmt) -> None:
        i = next((j for j in range(1, len(toks)) if is_word(toks, j, "cursor")), len(toks))
        i = next((j for j in range(i, len(toks)) if is_word(toks, j, "for")), len(toks))
        if i + 1 >= len(toks):
            st.parsed = False
            return
        inner = self._inner(text, toks[i + 1].start)  # runs on FETCH: its effects count
        st.parsed = inner.parsed
        st.reads |= inner.reads
        st.functions |= inner.functions
        st.flags |= inner.flags - {Flag.UNBOUNDED_SELECT}
        if inner.kind is not Kind.READ:
            st.kind = Kind.UNKNOWN

    def _prepare(self, text: str, toks: list[Tok], st: Stmt) -> None:
        parts, i = read_name(toks, 1)
        if is_punct(toks, i, "("):
            i = matching(toks, i)
        if parts is None or not is_word(toks, i, "as") or i + 1 >= len(toks):
            st.parsed = False
            return
        inner = self._inner(text, toks[i + 1].start)  # not run until EXECUTE
        st.parsed = inner.parsed
        st.reads |= inner.reads | inner.writes
        st.functions |= inner.functions
        st.flags |= inner.flags & {Flag.CATALOG, Flag.TEMP_TABLE}

    # ---- statements sqlglot could not parse ----

    def _create_as(self, text: str, toks: list[Tok], i: int, st: Stmt) -> None:
        """CREATE TABLE / [MATERIALIZED] VIEW ... AS query that sqlglot could not parse: the
        query (which CREATE TABLE AS and CREATE MATERIALIZED VIEW run) from its own parse."""
        depth = 0
        for j in range(i, len(toks)):
            tok = toks[j]
            if tok.kind == "p" and tok.value in "()":
                depth += 1 if tok.value == "(" else -1
            elif depth == 0 and tok.kind == "w" and tok.value == "as" and j + 1 < len(toks) and (
                    is_word(toks, j + 1, "select", "with", "values", "table") or is_punct(toks, j + 1, "(")):
                inner_text = _WITH_DATA.sub("", text[toks[j + 1].start:])
                parsed = parse_trees(inner_text)
                inner = self.statement(inner_text, parsed[0] if parsed and len(parsed) == 1 else None)
                st.parsed = inner.parsed and inner.kind is Kind.READ
                st.reads |= inner.reads
                st.functions |= inner.functions
                st.flags |= inner.flags - {Flag.UNBOUNDED_SELECT}
                return

    def _ddl(self, text: str, toks: list[Tok], st: Stmt) -> None:
        head = st.head
        i = 1
        if head == "truncate":
            i += 1 if is_word(toks, i, "table") else 0
            self._rels(read_names(toks, i, frozenset({"restart", "continue", "cascade", "restrict"}))[0],
                       st.writes, st, op="truncate")
            return
        if head in ("grant", "revoke"):
            on = next((j for j in range(1, len(toks)) if is_word(toks, j, "on")), None)
            if on is None:
                return  # GRANT role TO role
            i = on + 1
            if is_word(toks, i, "table", "sequence"):
                i += 1
            elif is_word(toks, i, "foreign") and is_word(toks, i + 1, "table"):
                i += 2
            elif is_word(toks, i, "all") or (is_word(toks, i) and is_word(toks, i + 1) and
                                            not is_word(toks, i + 1, "to", "from")):
                return  # ALL TABLES IN SCHEMA, SCHEMA s, FUNCTION f, DATABASE d ...
            self._rels(read_names(toks, i, frozenset({"to", "from"}))[0], st.writes, st)
            return
        if head == "comment":
            i = 2
            if is_word(toks, i, "materialized", "foreign"):
                i += 1
            if is_word(toks, i, "table", "view", "sequence"):
                self._rels(read_names(toks, i + 1)[0][:1], st.writes, st)
            elif is_word(toks, i, "column"):
                parts, _ = read_name(toks, i + 1)
                if parts and len(parts) > 1:
                    self._rels([parts[:-1]], st.writes, st)
            return
        temp = False
        while is_word(toks, i, "or", "replace", "global", "local", "temp", "temporary", "unlogged",
                    "unique", "recursive", "constraint"):
            temp = temp or toks[i].value in ("temp", "temporary")
            i += 1
        if temp:
            st.flags.add(Flag.TEMP_TABLE)
        if is_word(toks, i, "materialized", "foreign"):
            i += 1
        if not is_word(toks, i):
            return
        what = toks[i].value
        i += 1
        if head == "create" and what in ("table", "view"):
            self._create_as(text, toks, i, st)
        if head == "create" and what == "statistics":
            frm = next((j for j in range(i, len(toks)) if is_word(toks, j, "from")), None)
            if frm is not None:
                self._rels(read_names(toks, frm + 1)[0][:1], st.writes, st)
            return
        if head == "create" and what in ("index", "trigger", "policy", "rule"):
            on = next((j for j in range(i, len(toks)) if is_word(toks, j, "on")), None)
            if on is not None:
                j = on + 1
                if what == "rule":
                    j = next((k for k in range(j, len(toks)) if is_word(toks, k, "to")), len(toks)) + 1
                self._rels(read_names(toks, j)[0][:1], st.writes, st)
            return
        cascade = head == "drop" and any(is_word(toks, j, "cascade") for j in range(i, len(toks)))
        if head == "drop" and what == "schema" and cascade:
            i += 2 if is_word(toks, i, "if") else 0
            for parts in read_names(toks, i, frozenset({"cascade", "restrict"}))[0]:
                self.drop_schema(parts[-1], st)
            return
        if what not in ("table", "view", "sequence"):
            return  # functions, types, schemas, roles, extensions ...: not relations
        if head == "drop" and what in ("table", "view", "sequence"):
            i += 2 if is_word(toks, i, "if") else 0
            self._rels(read_names(toks, i, frozenset({"cascade", "restrict"}))[0], st.writes, st)
            if cascade:
                for qualified in list(st.writes):
                    st.writes |= self.catalog.dependent_views(qualified)
        elif head == "alter":
            i += 2 if is_word(toks, i, "if") else 0
            found = read_names(toks, i)[0][:1]
            if found and found[0] != ["all"]:
                self._rels(found, st.writes, st)
        elif head == "create":
            i += 3 if is_word(toks, i, "if") else 0
            parts, _ = read_name(toks, i)
            if parts:
                self._rels([parts], st.writes, st, create=True, temp=temp)

    def _dml(self, toks: list[Tok], st: Stmt) -> None:
        """SELECT / WITH / INSERT ... that sqlglot could not parse: the kind from keywords,
        conservatively (a data-modifying keyword anywhere in a WITH makes it a write)."""
        head = st.head
        depth = 0
        has_where = False
        prev = ""
        for j, tok in enumerate(toks):
            if tok.kind == "p":
                depth += {"(": 1, ")": -1}.get(tok.value, 0)
                prev = tok.value
                continue
            if tok.kind != "w":
                prev = ""
                continue
            word = tok.value
            if word in ("update", "share") and prev in ("for", "key", "no"):
                st.flags.add(Flag.LOCKING)
            elif word in ("insert", "update", "delete", "merge") and prev not in ("do", "then") and j > 0:
                if head in ("with", "select", "values", "table"):
                    st.kind = Kind.WRITE
                    if depth > 0 or head == "with":
                        st.flags.add(Flag.WRITABLE_CTE)
            elif word == "into" and depth == 0 and head == "select":
                st.kind = Kind.WRITE
                st.flags.add(Flag.SELECT_INTO)
            elif word == "where" and depth == 0:
                has_where = True
            prev = word
        if head in ("update", "delete") and not has_where:
            st.flags.add(Flag.UPDATE_NO_WHERE if head == "update" else Flag.DELETE_NO_WHERE)
        i = 1
        if head in ("insert", "merge", "delete"):
            i = 2
        if head in ("insert", "update", "delete", "merge"):
            i += 1 if is_word(toks, i, "only") else 0
            parts, _ = read_name(toks, i)
            if parts:
                op = {"insert": "insert", "update": "update", "delete": "delete", "merge": "merge"}[head]
                if head == "insert" and any(is_word(toks, j, "do") and is_word(toks, j + 1, "update")
                                            for j in range(len(toks))):
                    op = "update"  # ON CONFLICT DO UPDATE
                self._rels([parts], st.writes, st, op=op)

    def _huge_dml(self, text: str, toks: list[Tok], st: Stmt) -> None:
        """A query or DML statement past MAX_PARSE (a bulk INSERT, typically): its target from
        the first tokens, the rest from regular expressions over the text (conservative: a
        word inside a string literal counts as well)."""
        st.no_cache("statement too long to analyse")
        head = st.head
        if head in ("insert", "update", "delete", "merge"):
            i = (2 if head in ("insert", "merge", "delete") else 1)
            i += 1 if is_word(toks, i, "only") else 0
            parts, _ = read_name(toks, i)
            if parts:
                op = "update" if head == "insert" and _DO_UPDATE.search(text) else \
                    {"insert": "insert", "update": "update", "delete": "delete", "merge": "merge"}[head]
                self._rels([parts], st.writes, st, op=op)
            if head in ("update", "delete") and not _WHERE_WORD.search(text):
                st.flags.add(Flag.UPDATE_NO_WHERE if head == "update" else Flag.DELETE_NO_WHERE)
            return
        if _LOCKING_WORDS.search(text):
            st.flags.add(Flag.LOCKING)
        if head == "with" and _DML_WORDS.search(_LOCKING_WORDS.sub(" ", text)):
            st.kind = Kind.WRITE
            st.flags.add(Flag.WRITABLE_CTE)
        if head == "select" and _INTO_WORD.search(text):
            st.kind = Kind.WRITE
            st.flags.add(Flag.SELECT_INTO)

    def _scan_calls(self, toks: list[Tok], st: Stmt) -> None:
        """`name(` patterns in an unparsed statement: the built-in hazards among them."""
        for j in range(len(toks) - 1):
            tok = toks[j]
            if tok.kind in ("w", "q") and toks[j + 1].kind == "p" and toks[j + 1].value == "(":
                name = tok.value
                if name in KIND_BY_HEAD or name in ("in", "exists", "any", "all", "as", "values", "on",
                                                    "using", "over", "filter", "and", "or", "not"):
                    continue
                self._hazards(name, None, st)

    def _call(self, parts: list[str], st: Stmt) -> None:
        schema = parts[-2] if len(parts) > 1 else None
        resolved, _info = self.catalog.function(parts[-1], schema, self.path, self.user)
        st.functions.add(f"{resolved}.{parts[-1]}" if resolved else parts[-1])
        self._hazards(parts[-1], schema, st)

    # ---- names ----

    def _rels(self, names: list[list[str]], into: set[str], st: Stmt, *, create: bool = False,
              temp: bool = False, op: str = "ddl") -> None:
        for parts in names:
            if parts:
                schema = parts[-2] if len(parts) > 1 else None
                qualified = self.relation(schema, parts[-1], st, create=create, temp=temp)
                into.add(qualified)
                if into is st.writes:
                    into |= self.catalog.also_written(qualified, op)

    def drop_schema(self, schema: str, st: Stmt) -> None:
        """DROP SCHEMA ... CASCADE: every relation in it, and the views elsewhere built on them."""
        dropped = self.catalog.relations_in(schema)
        st.writes |= dropped
        for qualified in dropped:
            st.writes |= self.catalog.dependent_views(qualified)

    def relation(self, schema: str | None, name: str, st: Stmt, *, create: bool = False,
                 temp: bool = False) -> str:
        """'schema.name' for a relation (bare name if it cannot be resolved), noting what
        about it stands against caching: unknown, temporary, sequence, foreign, live catalog,
        a view over volatile functions."""
        catalog = self.catalog
        if temp:
            schema = "pg_temp"
        rel: Relation | None = None
        if schema is None:
            schema = catalog.creation_schema(self.path, self.user) if create else \
                catalog.resolve(name, self.path, self.user)
            if schema is None and not create:
                schema = self.created.get(name)  # created by an earlier statement of the text
            if schema is None:
                st.no_cache(f"unknown relation {name}")
                return name
            if create:
                self.created[name] = schema
        elif schema.startswith("pg_temp"):
            schema = "pg_temp"
        qualified = f"{schema}.{name}"
        rel = catalog.relation(schema, name)
        if rel is None and not create:
            st.no_cache(f"unknown relation {qualified}")
        if schema == "pg_temp" or (rel is not None and rel.persistence == "t"):
            st.flags.add(Flag.TEMP_TABLE)
            st.no_cache("temporary table")
        if schema in SYSTEM_SCHEMAS:
            st.flags.add(Flag.CATALOG)
            if schema == "pg_catalog" and live_catalog(name):
                st.no_cache(f"{name} changes without DDL")
        if rel is not None:
            if rel.row_security:
                st.no_cache(f"row-level security on {qualified} (policies may depend on the session)")
            if rel.kind == "S":
                st.no_cache(f"reads sequence {qualified}")
            elif rel.kind == "f":
                st.no_cache(f"foreign table {qualified} changes outside Postgres")
        return qualified

    def read_view(self, qualified: str, st: Stmt) -> None:
        """A user view is read through: its relations count as read; its definition is
        analysed like a query (once per catalog) and what stands against caching it, its
        flags and its functions become the reader's."""
        catalog = self.catalog
        view = catalog.view(qualified)
        if view is None or view.materialized:
            return
        st.reads |= view.relations
        verdict = catalog.view_verdicts.get(qualified)
        if verdict is None:
            catalog.view_verdicts[qualified] = (f"view {qualified} is defined in terms of itself",
                                                frozenset(), frozenset())  # guards recursion
            facts = SessionFacts(self.facts.database, self.facts.user, ("pg_catalog",))
            body = _Analyzer(facts, catalog).text(view.definition, None, None)
            why = f"view {qualified}: {body.why_not}" if body.why_not else ""
            if body.kind is not Kind.READ or body.statements != 1:
                why = f"view {qualified}: definition not understood"
            verdict = (why, frozenset(body.flags - {Flag.UNBOUNDED_SELECT}), frozenset(body.functions))
            catalog.view_verdicts[qualified] = verdict
        why, flags, functions = verdict
        if why:
            st.no_cache(why)
        st.flags |= flags
        st.functions |= functions

    def function(self, name: str, schema: str | None, st: Stmt, nargs: int,
                 first_arg: exp.Expression | None) -> Function | None:
        """An (Anonymous, i.e. not sqlglot-typed) function call; its catalog facts."""
        catalog = self.catalog
        resolved, info = catalog.function(name, schema, self.path, self.user)
        qualified = f"{resolved}.{name}" if resolved else name
        st.functions.add(qualified)
        builtin = resolved in (None, "pg_catalog") and schema in (None, "pg_catalog")
        if builtin:
            self._hazards(name, schema, st)
            if name == "age" and nargs == 1:
                st.no_cache("age() with one argument depends on the current date")
            if name == "set_config" and isinstance(first_arg, exp.Literal) and \
                    str(first_arg.this).lower() in ("role", "session_authorization"):
                st.flags.add(Flag.SET_ROLE)
        if info is None:
            st.no_cache(f"unknown function {qualified}()" if catalog.loaded
                        else "function volatility unknown (catalog not loaded)")
        elif info.volatility == "v":
            st.flags.add(Flag.VOLATILE_FUNCTION)
            st.no_cache(f"{qualified}() is volatile")
        elif info.volatility == "s" and resolved not in SYSTEM_SCHEMAS:
            st.no_cache(f"{qualified}() is a stable user-defined function (may read other tables)")
        return info

    def _hazards(self, name: str, schema: str | None, st: Stmt) -> None:
        if schema not in (None, "pg_catalog"):
            return
        time_dep, session_dep, side, danger = builtin_hazard(name)
        if side:
            st.flags.add(Flag.SIDE_EFFECT_FUNCTION)
            st.no_cache(f"{name}() has side effects")
        if danger:
            st.flags.add(Flag.DANGEROUS_FUNCTION)
        if time_dep:
            st.no_cache(f"{name}() depends on the time")
        if session_dep:
            st.no_cache(f"{name}() depends on the session or the server's state")


class _Walker:
    """Reads one sqlglot tree (whose type matches the statement's keywords) into a Stmt."""

    def __init__(self, analyzer: _Analyzer, st: Stmt) -> None:
        self.a = analyzer
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
                name = ident(node.this)
                if name in _SYSTEM_COLUMNS:
                    st.no_cache(f"system column {name} changes without a write")
                elif name in _LIVE_CATALOG_COLUMNS:
                    st.no_cache(f"{name} changes without DDL")
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
                self.a._rels([parts], st.writes, st, create=create, temp=temp, op=op)
        if self.cascade:  # DROP ... CASCADE: the views built on what it drops go too
            for qualified in list(st.writes):
                st.writes |= self.a.catalog.dependent_views(qualified)
        for table in tables:
            if id(table) in written or id(table) in skip:
                continue
            if not isinstance(table.this, exp.Identifier):
                continue  # a function in FROM: seen as a function
            parts = table_parts(table)
            if parts is None or (len(parts) == 1 and is_cte(table, parts[0])):
                continue
            schema = parts[-2] if len(parts) > 1 else None
            qualified = self.a.relation(schema, parts[-1], st)
            st.reads.add(qualified)
            if "." in qualified and not qualified.startswith(("pg_catalog.", "information_schema.")):
                self.a.read_view(qualified, st)
        if star and st.reads & _LIVE_STAR_TABLES:
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
                            self.a.drop_schema(ident(table.this) or ident(table.args.get("db")), st)
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
        a = self.a
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
            info = a.function(name, schema, st, len(args), args[0] if args else None)
            if info is not None and info.aggregate:
                aggregates.add(id(fn))
            return bool(info and info.returns_set) and not isinstance(fn.parent, exp.Table)
        cls = type(fn).__name__
        name = function_name(fn)
        if not name:
            return False
        if isinstance(fn, exp.AggFunc):
            aggregates.add(id(fn))
        # a built-in as far as sqlglot knows; the catalog decides which schema on the path has it
        resolved, info = a.catalog.function(name, None, a.path, a.user)
        if info is not None and resolved not in SYSTEM_SCHEMAS:
            args = fn.expressions or [v for k, v in fn.args.items() if isinstance(v, exp.Expression)]
            a.function(name, None, st, len(args), None)  # e.g. public.lower before pg_catalog
            return info.returns_set and not isinstance(fn.parent, exp.Table)
        st.functions.add(f"{resolved}.{name}" if resolved else name)
        a._hazards(name, None, st)
        if _TIME_CLASS.match(cls) and name not in TIME_DEPENDENT:
            st.no_cache(f"{name} depends on the time")
        if cls in _VOLATILE_CLASSES or (info is not None and info.volatility == "v"):
            st.flags.add(Flag.VOLATILE_FUNCTION)
            st.no_cache(f"{name}() is volatile")
        returns_set = cls in _SRF_CLASSES or bool(info and info.returns_set)
        return returns_set and not isinstance(fn.parent, exp.Table)


# ---- tree helpers ---------------------------------------------------------------------------------



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
