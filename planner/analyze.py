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

Where each part lives (the entry point imports the parts; no part imports it):
  keywords.py  tokenizer, token readers, the kind by leading keyword (KIND_BY_HEAD)
  result.py    Analysis (the text's), Stmt (one statement's), RANK (which kind wins)
  sqltree.py   small sqlglot helpers (identifiers, table names, CTE scoping, TREE_FOR)
  rules.py     name resolution and the cacheability rules (relations, functions, columns)
  hazards.py   built-in functions and pg_catalog relations judged by name (used by rules.py)
  walk.py      the sqlglot tree walk of one statement (Walker)
  reader.py    one statement: the tree walk when the tree fits, else its tokens
  analyze.py   the text: its statements read in order and merged, then judged (Rules.finish)
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from sqlglot import exp

from .catalog import Catalog
from .keywords import first_words, search_path_change, tokens
from .plan import Flag, Kind, SessionFacts
from .reader import StatementReader
from .result import RANK, Analysis
from .sqltree import MAX_PARSE, parse_trees
from .statements import split

__all__ = ["Analysis", "analyze", "analyze_statements", "first_words",
           "statement_kind", "tokens"]

logging.getLogger("sqlglot").setLevel(logging.ERROR)  # it warns on every fallback to Command


def analyze_statements(sql: str, facts: SessionFacts, catalog: Catalog,
                       expressions: Sequence[exp.Expression | None] | None = None,
                       statements: Sequence[str] | None = None) -> Analysis:
    """Analyse a (possibly multi-statement) text. `expressions`: sqlglot's parse of it (one
    tree per statement, e.g. the canonicalizer's), reused when it matches the statements;
    `statements`: the statement texts if already split. Never raises."""
    try:
        return Analyzer(facts, catalog).text(sql, expressions, statements)
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
        st = Analyzer(SessionFacts(), Catalog()).statement(sql, None)
    except Exception:
        return Kind.UNKNOWN, set()
    return st.kind, st.flags


class Analyzer(StatementReader):
    """One text in one session: its statements read in order (a SET search_path or a CREATE
    earlier in the text counts for the later ones), merged, then judged as a whole."""

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
                parsed = parse_trees(text) if self.wants_tree(text) else None
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
        self.finish(out, results)
        return out

    def view_body(self, definition: str, facts: SessionFacts) -> Analysis:
        return Analyzer(facts, self.catalog).text(definition, None, None)
