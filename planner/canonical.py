"""Canonical form of a statement, with sqlglot: one fingerprint for every spelling.

Folded together: keyword and unquoted identifier case, whitespace and comments,
redundant parentheses, literal values (lifted out as parameters), the order of AND/OR
operands and of IN lists of literals, and the alias of a lone table. Never folded:
anything that could change the meaning. A lifted parameter keeps its exact source text
(`'7'` and `7` differ), so equal (canonical SQL, params) means equal meaning.

The canonical SQL is for fingerprints and humans; pgsluice always runs the client's text.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from typing import cast

import sqlglot
from sqlglot import exp
from sqlglot.errors import SqlglotError
from sqlglot.optimizer.normalize_identifiers import normalize_identifiers

from .normalize import TIME_WORDS, FastShape

logging.getLogger("sqlglot").setLevel(logging.ERROR)  # it warns on every fallback to Command

_MARK = re.compile(r"__lit(\d+)__")
_PARAM = re.compile(r"\$(\d+)")
_BLANK = re.compile(r"__lit\d+__|\$\d+")
_IN_LIST = re.compile(r"\bIN \(((?:\$\d+, )*\$\d+)\)")


@dataclass(frozen=True, slots=True)
class Canonical:
    sql: str  # canonical SQL; lifted literals are $n, numbered after the query's own $n
    fingerprint: str
    params: tuple[str, ...]
    expressions: list[exp.Expression] = field(compare=False, repr=False)
    # For rebind(): which fast-shape literal each param came from (None: not mappable),
    # the fast literals that stayed in the SQL (their values must not change), and the
    # param index ranges that are sorted IN lists.
    sources: tuple[int, ...] | None = field(default=None, compare=False, repr=False)
    fixed: tuple[tuple[int, str], ...] = field(default=(), compare=False, repr=False)
    sorted_groups: tuple[tuple[int, int], ...] = field(default=(), compare=False, repr=False)

    def rebind(self, shape: FastShape) -> tuple[str, ...] | None:
        """The params canonicalize() would give for another text of the same fast shape,
        or None if that cannot be guaranteed."""
        if self.sources is None:
            return None
        lits = shape.literals
        for i, value in self.fixed:
            if lits[i] != value:
                return None
        params = [lits[i] for i in self.sources]
        for p in params:
            if p[:1] == "'" and TIME_WORDS.search(p):
                return None
        for start, end in self.sorted_groups:
            params[start:end] = sorted(params[start:end])
        return tuple(params)


def parse(sql: str) -> list[exp.Expression] | None:
    try:
        exprs = [cast(exp.Expression, e) for e in sqlglot.parse(sql, read="postgres") if e is not None]
    except (SqlglotError, RecursionError, ValueError):
        return None
    return exprs


def canonicalize(sql: str, shape: FastShape | None = None,
                 exprs: list[exp.Expression] | None = None) -> Canonical | None:
    """Canonical form of `sql` (all its statements), or None if sqlglot cannot parse it."""
    if exprs is None:
        exprs = parse(sql)
    if not exprs:
        return None
    own_max = max((int(m) for m in _PARAM.findall(sql)), default=0)
    lifted: list[tuple[int, str]] = []  # (source start, literal text)
    texts: list[str] = []
    groups: list[tuple[int, int]] = []
    for tree in exprs:
        tree = normalize_identifiers(tree.copy(), dialect="postgres")
        tree = _lift(tree, sql, lifted)
        for _ in range(2):  # a removed pair can expose another
            tree = tree.transform(_unparen, copy=False)
        tree = tree.transform(_commute, copy=False)
        _unalias_lone_table(tree)
        texts.append(tree.sql(dialect="postgres", comments=False))
    text = "; ".join(texts)
    order = [int(k) for k in _MARK.findall(text)]
    counter = iter(range(own_max + 1, own_max + 1 + len(order)))
    canonical_sql = _MARK.sub(lambda m: f"${next(counter)}", text)
    params = tuple(lifted[k][1] for k in order)
    for m in _IN_LIST.finditer(canonical_sql):
        numbers = [int(x) - own_max - 1 for x in _PARAM.findall(m.group(1))]
        if len(numbers) > 1 and numbers[0] >= 0 and numbers == list(range(numbers[0], numbers[-1] + 1)):
            groups.append((numbers[0], numbers[-1] + 1))
    params = _sort_groups(params, groups)
    sources = _sources(shape, [lifted[k][0] for k in order]) if shape is not None else None
    fixed: tuple[tuple[int, str], ...] = ()
    if shape is not None and sources is not None:
        used = set(sources)
        fixed = tuple((i, v) for i, v in enumerate(shape.literals) if i not in used)
    digest = hashlib.blake2b(canonical_sql.encode(), digest_size=16).hexdigest()
    return Canonical(canonical_sql, digest, params, exprs, sources, fixed, tuple(groups))


def _sort_groups(params: tuple[str, ...], groups: list[tuple[int, int]]) -> tuple[str, ...]:
    out = list(params)
    for start, end in groups:
        out[start:end] = sorted(out[start:end])
    return tuple(out)


def _sources(shape: FastShape, starts: list[int]) -> tuple[int, ...] | None:
    index = {s: i for i, s in enumerate(shape.starts)}
    out = []
    for s in starts:
        i = index.get(s)
        if i is None:
            return None
        out.append(i)
    return tuple(out) if len(set(out)) == len(out) else None


_ORDINAL_PARENTS = (exp.Order, exp.Group, exp.Ordered)


def _lift(tree: exp.Expression, sql: str, lifted: list[tuple[int, str]]) -> exp.Expression:
    """Replace literals by unique markers, remembering each one's exact source text."""
    for lit in list(tree.find_all(exp.Literal)):
        parent = lit.parent
        if isinstance(parent, exp.Parameter | exp.Placeholder | exp.DataTypeParam):
            continue  # $1 itself, varchar(20)
        if isinstance(parent, _ORDINAL_PARENTS) or (
                isinstance(parent, exp.Ordered) and lit.arg_key == "this"):
            continue  # ORDER BY 1 / GROUP BY 1 name a column
        if isinstance(parent, exp.Interval) and lit.arg_key == "unit":
            continue
        meta = lit.meta
        start, end = meta.get("start"), meta.get("end")
        if start is None or end is None or not _source_matches(sql, start, end, lit):
            continue  # no trustworthy source text: keep the literal in the SQL
        lifted.append((start, sql[start:end + 1]))
        lit.replace(exp.Var(this=f"__lit{len(lifted) - 1}__"))
    return tree


def _source_matches(sql: str, start: int, end: int, lit: exp.Literal) -> bool:
    text = sql[start:end + 1]
    if lit.is_string:
        return len(text) >= 2 and text[0] == "'" and text[-1] == "'"
    return text.replace("_", "") == str(lit.this).replace("_", "") or text == str(lit.this)


# sqlglot models some operators (AND, OR, ->, @>, ^, COLLATE...) as Func subclasses
_OPERATORS = (exp.Binary, exp.Connector, exp.Unary, exp.Predicate, exp.Collate, exp.Pow,
              exp.JSONExtract, exp.JSONExtractScalar, exp.JSONBExtract, exp.JSONBExtractScalar)


def _atomic(node: exp.Expression) -> bool:
    if isinstance(node, exp.Column | exp.Var | exp.Literal | exp.Paren | exp.Parameter):
        return True
    return isinstance(node, exp.Func) and not isinstance(node, _OPERATORS)


def _unparen(node: exp.Expression) -> exp.Expression:
    """Drop parentheses that cannot change precedence: around an atom, around a whole
    condition, and under AND / OR around anything but a different AND / OR."""
    while isinstance(node, exp.Paren):
        inner, parent = node.this, node.parent
        if _atomic(inner) or isinstance(parent, exp.Where | exp.Having) or (
                isinstance(parent, exp.And | exp.Or)
                and (not isinstance(inner, exp.Connector) or type(inner) is type(parent))):
            inner.parent = parent
            node = inner
        else:
            break
    return node


def _commute(node: exp.Expression) -> exp.Expression:
    """Sort the operands of AND / OR chains (by their text with literals blanked)."""
    if isinstance(node, exp.And | exp.Or):
        kind = type(node)
        terms = list(_flatten(node, kind))
        terms.sort(key=_sort_key)
        out = terms[0]
        for t in terms[1:]:
            out = kind(this=out, expression=t)
        return out
    return node  # IN lists of literals are sorted by value after numbering (_sort_groups)


def _flatten(node: exp.Expression, kind: type) -> list[exp.Expression]:
    out: list[exp.Expression] = []
    for side in (cast(exp.Expression, node.this), cast(exp.Expression, node.expression)):
        while isinstance(side, exp.Paren) and isinstance(side.this, kind):
            side = cast(exp.Expression, side.this)
        if isinstance(side, kind):
            out.extend(_flatten(side, kind))
        else:
            out.append(side)
    return out


def _sort_key(node: exp.Expression) -> str:
    """Operand text with every value blanked (lifted literals and $n alike), so the order
    never depends on values and canonicalizing a canonical text changes nothing."""
    return _BLANK.sub("?", node.sql(dialect="postgres", comments=False))


def _unalias_lone_table(tree: exp.Expression) -> None:
    """SELECT u.id FROM users u WHERE u.id = 1  ->  SELECT id FROM users WHERE id = 1,
    only for a plain SELECT over one table with no joins, subqueries or CTEs."""
    if not isinstance(tree, exp.Select) or tree.args.get("joins") or tree.args.get("with"):
        return
    tables = list(tree.find_all(exp.Table))
    if len(tables) != 1 or sum(1 for _ in tree.find_all(exp.Select)) != 1:
        return
    table = tables[0]
    alias = table.alias
    names = {table.name} | ({alias} if alias else set())
    for col in tree.find_all(exp.Column):
        if (col.table and col.table not in names) or (not col.table and col.name in names):
            return  # another qualifier, or a whole-row reference by the alias
    for col in tree.find_all(exp.Column):
        if col.table and not col.args.get("db"):
            col.set("table", None)
    if alias:
        table.set("alias", None)
