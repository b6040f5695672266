"""One statement read into a Stmt: through sqlglot's tree when it has the type the statement's
keywords call for (walk.Walker), else from its tokens. The token reader covers what sqlglot
gives no usable tree for: utility statements (SET, SHOW, VACUUM, LOCK, ...), statements that
wrap another (EXPLAIN, COPY, DECLARE, PREPARE: the inner one is read as a statement of its
own), DDL sqlglot parses as an opaque Command, and queries or DML it cannot parse or that are
too long to hand it (MAX_PARSE; then regular expressions over the text, conservatively).
What it cannot read completely is `parsed=False`, which makes the text uncacheable.
"""

from __future__ import annotations

import re
from itertools import islice

from sqlglot import exp

from .keywords import (
    KEYWORD_GRAMMAR,
    KIND_BY_HEAD,
    Tok,
    first_words,
    head_words,
    is_punct,
    is_word,
    matching,
    read_name,
    read_names,
    tokens,
)
from .plan import Flag, Kind
from .result import Stmt
from .rules import Rules
from .sqltree import MAX_PARSE, TREE_FOR, parse_trees
from .walk import Walker

_HUGE_TOKENS = 4096
_DO_UPDATE = re.compile(r"(?i)\bdo\s+update\b")
_WHERE_WORD = re.compile(r"(?i)\bwhere\b")
_LOCKING_WORDS = re.compile(r"(?i)\bfor\s+(?:update|share|no\s+key\s+update|key\s+share)\b")
_DML_WORDS = re.compile(r"(?i)\b(?:insert|update|delete|merge)\b")
_INTO_WORD = re.compile(r"(?i)\binto\b")
_WITH_DATA = re.compile(r"(?is)\bwith\s+(?:no\s+)?data\s*;?\s*$")


class StatementReader(Rules):
    """Reads statements for the analyzer (planner.analyze.Analyzer), with the rules it inherits."""

    def statement(self, text: str, tree: exp.Expression | None) -> Stmt:
        """One statement; `tree` is sqlglot's parse of it, used only if of the expected type."""
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
            Walker(self, st).run(tree)
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
            self.rels(read_names(t, i, frozenset({"in", "nowait"}))[0], st.reads, st)
        elif head in ("vacuum", "analyze", "analyse", "cluster"):
            t = all_tokens()
            i = 1
            if is_punct(t, i, "("):
                i = matching(t, i)
            while is_word(t, i, "full", "freeze", "verbose", "analyze", "analyse", "skip_locked"):
                i += 1
            self.rels(read_names(t, i, frozenset({"using"}))[0], st.reads, st)
        elif head == "reindex":
            t = all_tokens()
            i = 1
            if is_punct(t, i, "("):
                i = matching(t, i)
            if is_word(t, i, "table"):
                i += 2 if is_word(t, i + 1, "concurrently") else 1
                self.rels(read_names(t, i)[0][:1], st.reads, st)
        elif head == "refresh":
            t = all_tokens()
            i = 3 + (1 if is_word(t, 3, "concurrently") else 0)
            self.rels(read_names(t, i)[0][:1], st.writes, st, op="ddl")
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
                self.call(parts, st)
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
        parsed = parse_trees(inner_text) if self.wants_tree(inner_text) else None
        tree = parsed[0] if parsed is not None and len(parsed) == 1 else None
        return self.statement(inner_text, tree)

    @staticmethod
    def wants_tree(text: str) -> bool:
        """Is there a sqlglot tree worth asking for (one its leading keyword calls for)?"""
        words = first_words(text, 1)
        return bool(words) and words[0] in TREE_FOR

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
            parsed = parse_trees(inner_text) if self.wants_tree(inner_text) else None
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
                self.rels([target], st.writes, st, op="insert")
        else:
            st.flags.add(Flag.COPY_TO)
            st.kind = Kind.WRITE if program or to_file else Kind.READ
            if target is not None:
                self.rels([target], st.reads, st)
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
            self.rels(read_names(toks, i, frozenset({"restart", "continue", "cascade", "restrict"}))[0],
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
            self.rels(read_names(toks, i, frozenset({"to", "from"}))[0], st.writes, st)
            return
        if head == "comment":
            i = 2
            if is_word(toks, i, "materialized", "foreign"):
                i += 1
            if is_word(toks, i, "table", "view", "sequence"):
                self.rels(read_names(toks, i + 1)[0][:1], st.writes, st)
            elif is_word(toks, i, "column"):
                parts, _ = read_name(toks, i + 1)
                if parts and len(parts) > 1:
                    self.rels([parts[:-1]], st.writes, st)
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
                self.rels(read_names(toks, frm + 1)[0][:1], st.writes, st)
            return
        if head == "create" and what in ("index", "trigger", "policy", "rule"):
            on = next((j for j in range(i, len(toks)) if is_word(toks, j, "on")), None)
            if on is not None:
                j = on + 1
                if what == "rule":
                    j = next((k for k in range(j, len(toks)) if is_word(toks, k, "to")), len(toks)) + 1
                self.rels(read_names(toks, j)[0][:1], st.writes, st)
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
            self.rels(read_names(toks, i, frozenset({"cascade", "restrict"}))[0], st.writes, st)
            if cascade:
                for qualified in list(st.writes):
                    st.writes |= self.catalog.dependent_views(qualified)
        elif head == "alter":
            i += 2 if is_word(toks, i, "if") else 0
            found = read_names(toks, i)[0][:1]
            if found and found[0] != ["all"]:
                self.rels(found, st.writes, st)
        elif head == "create":
            i += 3 if is_word(toks, i, "if") else 0
            parts, _ = read_name(toks, i)
            if parts:
                self.rels([parts], st.writes, st, create=True, temp=temp)

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
                self.rels([parts], st.writes, st, op=op)

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
                self.rels([parts], st.writes, st, op=op)
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
                self.hazards(name, None, st)
