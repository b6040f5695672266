"""Canonical form of a text, with sqlglot: one fingerprint for every spelling of a query.

Folded: keyword and unquoted name case, whitespace, comments, redundant parentheses, literal values
(lifted out as $n after the text's own), the order of AND / OR operands and of IN lists, the alias
of a lone table. Whatever could change the meaning stays: equal (sql, params) means equal meaning.

Before sqlglot parses a read/write statement, the fast scanner's literals become markers and calls
are marked anonymous, so sqlglot rewrites nothing (it would turn date_part into EXTRACT, max(a, b)
into GREATEST, split interval '5 days', read 0x1F as a bit string...) and the parse depends on the
fast shape only. An intact marker becomes a placeholder; a mangled one, or one whose value shapes
the statement (a type modifier, a relation name), goes back in as the literal. So `rebind` is
exact. Other statements (DDL, SET, COPY...) are canonical at the token level.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import cast

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError

from .normalize import (
    KEYWORDS,
    SPECIAL_WORDS,
    FastShape,
    ascii_lower,
    fast_shape,
    literal_sql,
    normalize_tokens,
    sorted_values,
    statement_spans,
)

logging.getLogger("sqlglot").setLevel(logging.ERROR)  # it warns on every fallback to Command

Source = int | str  # a fast literal's index (~index: negated), or a constant param (TRUE, NULL)

_DIALECT = sqlglot.Dialect.get_or_raise("postgres")
_LOCAL = threading.local()
_ERRORS = (SqlglotError, RecursionError, ValueError, TypeError, KeyError, IndexError, AttributeError)
_LIFT_HEADS = frozenset(("select", "with", "values", "table", "insert", "update", "delete", "merge", "("))
_LIFT_TREES = (exp.Query, exp.Values, exp.Insert, exp.Update, exp.Delete, exp.Merge)
_NUM_MARK = "42{:07d}7"  # number i becomes 42iiiiiii7; string i becomes '\x01i\x01'
_CONST_BASE = 10_000_000  # TRUE / FALSE / NULL markers are numbered from here
_MARKS = re.compile(r"'\x01(\d+)\x01'|(?<![\w.$])42(\d{7})7(?![\w.])")
_BLANK = re.compile(r"'\x01\d+\x01'|(?<![\w.$])42\d{7}7(?![\w.])|\$\d+")
_STRAY = re.compile(r"\x01(\d+)\x01")
_ANONYMOUS = f" /* {exp.SQLGLOT_ANONYMOUS} */"  # after a call's `)`: sqlglot keeps it as written
# Calls sqlglot parses specially whatever their arguments (date_part becomes EXTRACT, "trim"(x) TRIM(x)):
# disguised as "\x01date_part" (unquoted) and "\x02Name" (quoted) before parsing, restored after.
_SPECIAL_CALLS = frozenset(_DIALECT.parser_class.FUNCTION_PARSERS)
# String arguments that name an object or a setting decide what the statement touches: kept.
_SENSITIVE = re.compile(r"(?i)(pg_|to_reg|has_|lo_|dblink|txid_|(set_config|current_setting|nextval|currval"
                        r"|setval|obj_description|col_description|format_type)$)")
_ORDINAL_PARENTS = (exp.Ordered, exp.Group, exp.Rollup, exp.Cube, exp.GroupingSets)
_OPERATOR_NAME = re.compile(r'"(?:[^"]|"")*"|[^"]+')  # OPERATOR(Schema.~): unquoted parts fold
_SAFE_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_KEYWORDS = KEYWORDS | {k.lower() for k in _DIALECT.tokenizer_class.KEYWORDS}  # "user" stays quoted


@dataclass(frozen=True, slots=True)
class Canonical:
    sql: str  # canonical SQL; lifted literals are $n, numbered after the text's own $n
    fingerprint: str  # blake2b-128 of sql, hex
    params: tuple[str, ...]  # lifted values as canonical SQL literals, in placeholder order
    # For rebind(): each param's Source (None: not rebindable), the fast literals that stayed in
    # the SQL (they must not change), the param ranges that are sorted IN lists, the literal count.
    sources: tuple[Source, ...] | None = field(default=None, compare=False, repr=False)
    fixed: tuple[tuple[int, str], ...] = field(default=(), compare=False, repr=False)
    groups: tuple[tuple[int, int], ...] = field(default=(), compare=False, repr=False)
    literal_count: int = field(default=0, compare=False, repr=False)
    _text: str = field(default="", compare=False, repr=False)
    _trees: list[list[exp.Expression]] = field(default_factory=list, compare=False, repr=False)

    @property
    def expressions(self) -> list[exp.Expression]:
        """sqlglot's parse of the original text, for other modules to reuse (parsed on first use
        unless canonicalize() was given it). Never mutated here."""
        if not self._trees:
            self._trees.append(parse(self._text) or [])
        return self._trees[0]

    def rebind(self, literals: tuple[str, ...] | FastShape) -> tuple[str, ...] | None:
        """The params canonicalize() would give another text with the same FastShape.key, from
        that text's FastShape.literals; None when that cannot be guaranteed."""
        if isinstance(literals, FastShape):
            literals = literals.literals
        if self.sources is None or len(literals) != self.literal_count:
            return None
        if any(literals[i] != text for i, text in self.fixed):
            return None
        params: list[str] = []
        for source in self.sources:
            if isinstance(source, str):
                params.append(source)
                continue
            value = literal_sql(literals[~source if source < 0 else source])
            if value is None or (value[0] == "'" and SPECIAL_WORDS.search(value)):
                return None  # undecodable, or 'now', 'epoch'... (the plan depends on them)
            params.append("-" + value if source < 0 else value)
        for start, end in self.groups:
            params[start:end] = sorted_values(params[start:end])
        return tuple(params)


def parse(sql: str) -> list[exp.Expression] | None:
    """sqlglot's parse of `sql` (one tree per statement), or None if it fails."""
    try:
        return [cast(exp.Expression, e) for e in sqlglot.parse(sql, read=_DIALECT) if e is not None]
    except _ERRORS:  # sqlglot raises more than ParseError on odd input
        return None


def canonicalize(sql: str, shape: FastShape | None = None,
                 exprs: list[exp.Expression] | None = None) -> Canonical | None:
    """Canonical form of `sql` (all its statements), or None when it cannot be given one safely:
    sqlglot cannot parse a read/write statement, or the fast scanner refuses one (dollar quotes,
    string continuation...); the caller then treats the text as opaque. `shape`: fast_shape(sql)
    if known; `exprs`: parse(sql) if known (kept as .expressions, never mutated)."""
    try:
        return _canonicalize(sql, shape, exprs)
    except _ERRORS:  # a bug here must not break the proxy
        return None


def _canonicalize(sql: str, shape: FastShape | None, exprs: list[exp.Expression] | None) -> Canonical | None:
    shape = shape or fast_shape(sql)
    if shape is None:  # only statements that neither read nor write rows, at the token level
        try:
            texts = [normalize_tokens(sql[start:end]) for start, end in statement_spans(sql)]
        except ValueError:
            return None  # not even PostgreSQL could lex it
        if not texts or any(t.split(" ", 1)[0] in _LIFT_HEADS or _MARKS.search(t) for t in texts):
            return None
        return _result(sql, "; ".join(texts), (), None, (), (), 0, exprs)
    if "\x01" in sql:
        return None  # the character markers are made of
    canon = [literal_sql(text) for text in shape.literals]
    firsts = [first for _, first, _, _ in shape.statements] + [len(canon)]
    consts: dict[int, str] = {}
    texts, negated, groups = [], set(), []
    for k, (head, first, start, end) in enumerate(shape.statements):
        if head not in _LIFT_HEADS:
            texts.append(normalize_tokens(sql[start:end]))
            if _MARKS.search(texts[-1]):
                return None  # a literal that looks like a marker
            continue
        done = _statement(sql, shape, canon, range(first, firsts[k + 1]), start, end, consts)
        if done is None:
            return None
        texts.append(done.body)
        negated |= done.negated
        groups += done.groups
    return _number(sql, shape, canon, "; ".join(texts), consts, negated, groups, exprs) if texts else None


def _statement(sql: str, shape: FastShape, canon: list[str | None], literals: range, start: int, end: int,
               consts: dict[int, str]) -> _Statement | None:
    """A read/write statement through sqlglot with its literals as markers. Markers sqlglot
    mangles (or all of them, if it cannot parse) go back in as literals, and it tries again."""
    liftable = {i for i in literals if canon[i] is not None}
    lift_consts = True
    for _attempt in range(4):
        trees = parse(_marked(sql, shape, canon, liftable, literals, start, end))
        if not trees or len(trees) != 1 or isinstance(trees[0], exp.Command):
            if not liftable and not lift_consts:
                return None
            liftable.clear()
            lift_consts = False
            continue
        mine: dict[int, str] = {}
        st = _Statement(trees[0], canon, mine, _CONST_BASE + len(consts), lift_consts)
        seen = Counter(int(a or b) for a, b in _MARKS.findall(st.body))
        ok = st.lifted | set(mine)
        bad = {i for i, n in seen.items() if n != 1 or i not in ok} | (ok - set(seen))
        bad |= {int(i) for i in _STRAY.findall(_MARKS.sub("", st.body))}  # printed without quotes
        bad |= liftable - st.lifted - st.restored  # gone
        if not bad:
            consts.update(mine)
            return st
        lift_consts = lift_consts and all(i < _CONST_BASE for i in bad)
        liftable -= bad
    return None


def _marked(sql: str, shape: FastShape, canon: list[str | None], liftable: set[int], literals: range,
            start: int, end: int) -> str:
    """A statement's text for sqlglot: liftable literals as markers, the others in canonical form
    (sqlglot never sees 0x1F, 1_000 or E''), no comments (it cannot parse ORDER /* c */ BY), and
    every call marked anonymous, date_part disguised."""
    edits = [(at, at + len(text), (f"'\x01{i}\x01'" if text[0] in "'eE" else _NUM_MARK.format(i))
              if i in liftable else canon[i] or text)
             for i, text, at in ((i, shape.literals[i], shape.starts[i]) for i in literals)]
    edits += [(at, stop, " ") for at, stop in shape.comments if start <= at < end]
    for name_at, name_end, close in shape.calls:
        if start <= name_at and close <= end:
            name = sql[name_at:name_end]
            if name.lower() == "date_part":
                edits.append((name_at, name_end, '"\x01date_part"'))
            elif name[0] == '"' and name[1:-1].replace('""', '"').upper() in _SPECIAL_CALLS:
                edits.append((name_at, name_end, f'"\x02{name[1:]}'))
            edits.append((close, close, _ANONYMOUS))
    out, pos = [], start
    for a, b, new in sorted(edits):
        out += [sql[pos:a], new]
        pos = b
    return "".join(out) + sql[pos:end]


def _number(sql: str, shape: FastShape, canon: list[str | None], body: str, consts: dict[int, str],
            negated: set[int], groups: list[list[int]], exprs: list[exp.Expression] | None) -> Canonical:
    """Placeholders numbered in order of appearance after the text's own; params and sources."""
    order = [int(a or b) for a, b in _MARKS.findall(body)]
    position = {i: k for k, i in enumerate(order)}
    sources: list[Source] = [consts.get(i, ~i if i in negated else i) for i in order]
    params = [s if isinstance(s, str) else "-" + cast(str, canon[~s]) if s < 0 else cast(str, canon[s])
              for s in sources]
    ranges = []
    for group in groups:
        first = position[group[0]]
        if [position[i] for i in group] == list(range(first, first + len(group))):
            ranges.append((first, first + len(group)))
            params[first:first + len(group)] = sorted_values(params[first:first + len(group)])
    counter = iter(range(shape.max_param + 1, shape.max_param + 1 + len(order)))
    text = _MARKS.sub(lambda _: f"${next(counter)}", body)
    used = {i for i in order if i not in consts}
    fixed = tuple((i, lit) for i, lit in enumerate(shape.literals) if i not in used)
    rebindable = not any(p[0] == "'" and SPECIAL_WORDS.search(p) for p in params)
    return _result(sql, text, tuple(params), tuple(sources) if rebindable else None, fixed, tuple(ranges),
                   len(shape.literals), exprs)


def _result(sql: str, text: str, params: tuple[str, ...], sources: tuple[Source, ...] | None,
            fixed: tuple[tuple[int, str], ...], groups: tuple[tuple[int, int], ...], count: int,
            exprs: list[exp.Expression] | None) -> Canonical:
    digest = hashlib.blake2b(text.encode(), digest_size=16).hexdigest()
    trees = [] if exprs is None else [exprs]
    return Canonical(text, digest, params, sources, fixed, groups, count, sql, trees)


def _sql(node: exp.Expr) -> str:
    """sqlglot's PostgreSQL text of a node (no copy: every tree here is owned by this module)."""
    generator = getattr(_LOCAL, "generator", None)  # one per thread: a generator is not reentrant
    if generator is None:
        generator = _LOCAL.generator = _DIALECT.generator(normalize_functions=False, comments=False)
    return cast(str, generator.generate(node, copy=False))


class _Statement:
    """One statement's tree (sqlglot's parse of the marked text), canonicalized in place: what
    was lifted, what went back in as a literal, the IN lists of placeholders, the text."""

    def __init__(self, tree: exp.Expression, canon: list[str | None], consts: dict[int, str],
                 const_base: int, lift_consts: bool) -> None:
        self.canon, self.consts, self.const_base = canon, consts, const_base
        self.lift = isinstance(tree, _LIFT_TREES)
        self.lift_consts = lift_consts and self.lift
        self.lifted: set[int] = set()  # markers left in the tree as placeholders
        self.restored: set[int] = set()  # markers put back as their literal
        self.negated: set[int] = set()  # markers whose unary minus was folded into the value
        self.groups: list[list[int]] = []  # IN lists made only of markers
        later: list[exp.Expr] = []  # parentheses, minus signs, AND / OR, IN, in walk order
        columns: list[exp.Column] = []
        scopes = 0  # tables, SELECTs, subqueries, VALUES
        for node in list(tree.walk()):
            kind = _KINDS.get(type(node)) or _kind(type(node))
            if kind == _LATER:
                later.append(node)
            elif kind == _SCOPE:
                scopes += 1
            elif kind == _COLUMN:
                columns.append(cast(exp.Column, node))
            elif kind != _OTHER:
                self._normalize(node, kind)
        if isinstance(tree, exp.Select) and scopes == 2:
            _unalias_lone_table(tree, columns)
        for node in reversed(later):  # children first
            if isinstance(node, exp.Paren):
                _unparen(node)
            elif isinstance(node, exp.Neg):
                self._fold_minus(node)
            elif isinstance(node, exp.And | exp.Or):
                if type(node.parent) is not type(node):
                    _sort_operands(node)
            elif (marks := [_marker(item) for item in node.expressions]) and None not in marks:
                self.groups.append(cast(list[int], marks))  # IN (...)
        self.body = _sql(tree)

    def _normalize(self, node: exp.Expr, kind: int) -> None:
        if kind == _IDENTIFIER:
            _normalize_identifier(cast(exp.Identifier, node))
        elif kind == _CALL:
            name = node.this
            if isinstance(name, exp.Identifier):
                if name.this[:1] in ("\x01", "\x02"):  # disguised
                    name = exp.Identifier(this=name.this[1:], quoted=name.this[0] == "\x02")
                _normalize_identifier(name)
                name = name if name.quoted else name.name
            if isinstance(name, str):
                node.set("this", name.upper() if name.isascii() else name)
        elif kind == _VAR and "'" not in node.name and '"' not in node.name:
            node.set("this", node.name.upper())  # a keyword sqlglot keeps as written (THEN delete)
        elif kind == _KEYWORD_ARGS:  # ROWS BETWEEN 1 PRECEDING, FETCH NEXT...
            for key, value in list(node.args.items()):
                if isinstance(value, str):
                    node.set(key, value.upper())
        elif kind == _OPERATOR:
            name = str(node.args["operator"])
            node.set("operator", _OPERATOR_NAME.sub(lambda m: ascii_lower(m.group()), name))
        elif kind == _LITERAL:
            i = _marker(node)
            if i is not None:
                self._place(cast(exp.Literal, node), i)
        elif kind == _INTERVAL and isinstance(node.this, exp.Parameter):
            unit = node.args.get("unit")  # sqlglot would print INTERVAL $1 DAY as INTERVAL '1 DAY'
            node.replace(exp.Var(this=f"INTERVAL {_sql(node.this)}" + (f" {_sql(unit)}" if unit else "")))
        elif kind == _CONSTANT and self.lift_consts and not isinstance(node.parent, exp.Is):  # IS NULL stays
            i = self.const_base + len(self.consts)
            self.consts[i] = "NULL" if isinstance(node, exp.Null) else "TRUE" if node.this else "FALSE"
            node.replace(exp.Literal.string(f"\x01{i}\x01"))

    def _place(self, node: exp.Literal, i: int) -> None:
        """Keep a marker as a placeholder, or put its literal back where the value matters."""
        parent = node.parent  # the value matters in varchar(20), ORDER BY 1, DISTINCT ON (1), nextval('s')
        keep = self.lift and not isinstance(parent, exp.DataTypeParam) \
            and not (isinstance(parent, _ORDINAL_PARENTS) and not node.is_string) \
            and not (isinstance(parent, exp.Tuple) and isinstance(parent.parent, exp.Distinct))
        if keep and isinstance(parent, exp.Func) and not isinstance(parent, exp.Cast | exp.Binary):
            name = parent.name if isinstance(parent, exp.Anonymous) else parent.sql_name()
            keep = not _SENSITIVE.match(name)
        if keep and isinstance(parent, exp.Cast) and _sql(parent.to).upper().startswith("REG"):
            keep = False  # 'users'::regclass names a relation
        text = self.canon[i] if i < len(self.canon) else None
        if not keep and text is not None:
            self.restored.add(i)
            node.replace(exp.Literal.string(text[1:-1].replace("''", "'")) if text[0] == "'"
                         else exp.Literal.number(text))
        elif keep:
            self.lifted.add(i)
            if isinstance(parent, exp.Interval) and parent.args.get("unit") is not None:
                # sqlglot prints INTERVAL '5' DAY as INTERVAL '5 DAY': the unit stays outside
                parent.replace(exp.Var(this=f"INTERVAL {_sql(node)} {_sql(parent.args['unit'])}"))

    def _fold_minus(self, node: exp.Neg) -> None:
        """-5 is one literal: lifted with its sign, unless under another minus (`- -5`)."""
        i = _marker(node.this)
        if i is None or i >= _CONST_BASE or node.this.is_string:
            return
        up = node.parent
        while isinstance(up, exp.Paren):
            up = up.parent
        if not isinstance(up, exp.Neg):
            self.negated.add(i)
            node.replace(node.this)


_OTHER, _LATER, _SCOPE, _COLUMN, _IDENTIFIER, _CALL, _VAR, _KEYWORD_ARGS, _OPERATOR, _LITERAL, _INTERVAL, \
    _CONSTANT = range(1, 13)  # not 0: a cached kind is truthy
_KIND_OF = ((exp.Paren, _LATER), (exp.Neg, _LATER), (exp.And, _LATER), (exp.Or, _LATER), (exp.In, _LATER),
            (exp.Table, _SCOPE), (exp.Select, _SCOPE), (exp.Subquery, _SCOPE), (exp.Values, _SCOPE),
            (exp.Column, _COLUMN), (exp.Identifier, _IDENTIFIER), (exp.Anonymous, _CALL), (exp.Var, _VAR),
            ((exp.WindowSpec, exp.Fetch, exp.RecursiveWithSearch, exp.Join, exp.Window), _KEYWORD_ARGS),
            (exp.Operator, _OPERATOR), (exp.Literal, _LITERAL), (exp.Interval, _INTERVAL),
            ((exp.Boolean, exp.Null), _CONSTANT))
_KINDS: dict[type, int] = {}


def _kind(cls: type) -> int:
    """What _Statement does with a node of this class (isinstance once per class, then a look-up)."""
    _KINDS[cls] = next((kind for types, kind in _KIND_OF if issubclass(cls, types)), _OTHER)
    return _KINDS[cls]


def _marker(node: exp.Expr) -> int | None:
    if not isinstance(node, exp.Literal):
        return None
    value = str(node.this)
    if node.is_string:
        ok = len(value) > 2 and value[0] == "\x01" and value[-1] == "\x01" and value[1:-1].isdigit()
        return int(value[1:-1]) if ok else None
    ok = len(value) == 10 and value[:2] == "42" and value[-1] == "7" and value.isdigit()
    return int(value[2:9]) if ok else None


def _normalize_identifier(node: exp.Identifier) -> None:
    name = str(node.this)
    if not node.quoted:
        node.set("this", ascii_lower(name))
    elif _SAFE_NAME.fullmatch(name) and name not in _KEYWORDS:
        node.set("quoted", False)  # "users" is users


# ---- parentheses, aliases, AND / OR ------------------------------------------------------------------

_ATOMS = (exp.Column, exp.Literal, exp.Parameter, exp.Placeholder, exp.Boolean, exp.Null, exp.Paren,
          exp.Subquery, exp.Case, exp.Exists, exp.Anonymous, exp.Var, exp.Cast, exp.Extract)  # one term
_KEEP_PARENS = (exp.Ordered, exp.Group, exp.Rollup, exp.Cube, exp.GroupingSets, exp.Distinct, exp.Dot,
                exp.Bracket, exp.Tuple, exp.Any, exp.All, exp.Paren)
_CLAUSES = (exp.Where, exp.Having, exp.Select, exp.Alias, exp.Anonymous)


def _unparen(node: exp.Paren) -> None:
    """Drop parentheses that cannot matter: around an atom or a call, around a whole clause or
    argument, inside AND / OR (but an OR's under an AND), a NOT's around a comparison. Never in
    ORDER BY / GROUP BY / DISTINCT ON (`ORDER BY (1)` is not `ORDER BY 1`, nor `(a)` `a` when an
    output column is named a), never before . or [ (`(a).b` is not `a.b`), nor after ANY."""
    while isinstance(node.this, exp.Paren):
        node.set("this", node.this.this)  # ((x)) is (x)
    inner, parent, key = node.this, node.parent, node.arg_key
    if parent is None or isinstance(parent, _KEEP_PARENS):
        return
    logic = isinstance(parent, exp.Or) or (isinstance(parent, exp.And) and not isinstance(inner, exp.Or))
    negated = isinstance(parent, exp.Not) and isinstance(inner, exp.Predicate) \
        and not isinstance(inner, exp.Connector)
    clause = (isinstance(parent, _CLAUSES) and key in ("this", "expressions")) \
        or (isinstance(parent, exp.Join) and key == "on")
    if logic or negated or clause or isinstance(inner, _ATOMS):
        node.replace(inner)


def _unalias_lone_table(select: exp.Select, columns: list[exp.Column]) -> None:
    """SELECT u.id FROM users u WHERE u.id = $1 -> SELECT id FROM users WHERE id = $1: only for a
    SELECT over one plain table with no join, subquery, CTE, WINDOW or locking clause, and never
    where a bare name could then mean something else: a whole-row reference (`SELECT u FROM
    users u`), an output column in ORDER BY / DISTINCT ON (`SELECT u.b AS a FROM t u ORDER BY
    u.a`). (Attribute notation for a function, `u.f` for f(u), becomes `f`: then an error.)"""
    args = select.args
    table = args["from_"].this if args.get("from_") else None
    if not isinstance(table, exp.Table) or not isinstance(table.this, exp.Identifier) \
            or any(args.get(k) for k in ("joins", "laterals", "with_", "locks", "into", "windows")):
        return
    alias = table.args.get("alias")
    if alias is not None and (alias.args.get("columns") or not isinstance(alias.this, exp.Identifier)):
        return
    name = alias.name if alias is not None else table.name
    qualified = []
    for col in columns:
        db, catalog = col.text("db"), col.text("catalog")
        if not col.table and col.name in (name, table.name):
            return  # a whole-row reference, or a name that would become one
        if col.table and (col.table != name or (db and (alias is not None or db != table.text("db")))
                          or (catalog and catalog != table.text("catalog"))):
            return  # another qualifier (with an alias, the table's own name is an error)
        qualified += [col] if col.table else []
    outputs = {e.alias for e in select.expressions if isinstance(e, exp.Alias)}
    implicit = any(not isinstance(e, exp.Alias | exp.Column | exp.Star) for e in select.expressions)
    distinct = args.get("distinct")
    bare = [o.this for o in (args["order"].expressions if args.get("order") else [])]
    bare += distinct.args["on"].expressions if distinct is not None and distinct.args.get("on") else []
    if any(isinstance(e, exp.Column) and e.table and (implicit or e.name in outputs) for e in bare):
        return  # ORDER BY u.a would become ORDER BY a: the output column
    for col in qualified:
        for part in ("table", "db", "catalog"):
            col.set(part, None)
    table.set("alias", None)


def _sort_operands(node: exp.Expression) -> None:
    """Flatten an AND / OR chain and sort its operands by their text with every value blanked
    (markers and $n alike): the order never depends on values, and canonicalizing a canonical
    text changes nothing. Operands that look alike keep their order."""
    kind, terms, stack = type(node), [], [node]
    while stack:
        top = stack.pop()
        if isinstance(top, kind):
            stack += [cast(exp.Expression, top.expression), cast(exp.Expression, top.this)]
        else:
            terms.append(top)
    keyed = sorted((_BLANK.sub("?", _sql(t)), k) for k, t in enumerate(terms))
    if [k for _, k in keyed] != list(range(len(terms))):
        out = terms[keyed[0][1]].pop()
        for _, k in keyed[1:]:
            out = kind(this=out, expression=terms[k].pop())
        node.replace(out)
