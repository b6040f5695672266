"""Which reads burst batching may merge: point reads of one table by its key.

A read is batchable when many of its kind, differing only in the key value, can run as one
statement `... WHERE key = ANY($n)` and each still get exactly its own answer: a cacheable
single SELECT of one table (no join, subquery, CTE, set operation), pinned by equality of the
table's single-column primary key (or unique NOT NULL key) to one placeholder — a bound
parameter or a lifted literal, without a cast — used nowhere else; no LIMIT / OFFSET / FETCH,
aggregate, window, GROUP BY / HAVING or DISTINCT ON, and no children (inheritance or
partitions). Uniqueness is what makes the split exact: each key value has at most one row.

Decided once per shape on the canonical tree (lone-table aliases folded, literals numbered).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlglot import exp

from .canonical import parse
from .catalog import Catalog
from .plan import SessionFacts
from .reach import conjuncts, resolve_table
from .tables import INT_TYPES, KEY_TYPES

# the array type of each key type (pg_type.typarray)
ARRAY_TYPES = {20: 1016, 21: 1005, 23: 1007, 25: 1009, 1043: 1015, 2950: 2951}


@dataclass(frozen=True, slots=True)
class Batchable:
    table: str  # "schema.name"
    column: str  # the key column
    type_oid: int
    placeholder: int  # its $n in the canonical SQL
    own: bool  # True: a parameter of the text, bound at Bind; False: a lifted literal

    @property
    def array_oid(self) -> int:
        return ARRAY_TYPES[self.type_oid]

    @property
    def integer(self) -> bool:
        return self.type_oid in INT_TYPES


def batchable(canonical: str, own_params: int, tables_read: Iterable[str], facts: SessionFacts,
              catalog: Catalog) -> tuple[Batchable | None, str]:
    """(what to batch on, "") or (None, why not)."""
    tables = list(tables_read)
    if len(tables) != 1:
        return None, "reads more than one table" if tables else "reads no table"
    trees = parse(canonical)
    if not trees or len(trees) != 1 or not isinstance(trees[0], exp.Select):
        return None, "not a single plain SELECT"
    tree = trees[0]
    why = _shape(tree)
    if why:
        return None, why
    from_ = tree.args.get("from_")
    table = from_.this if from_ is not None else None
    if not isinstance(table, exp.Table) or (table.args.get("alias") is not None and \
            table.args["alias"].args.get("columns")):
        return None, "not a plain table in FROM"
    name = resolve_table(table, facts, catalog)
    if name is None or name != tables[0]:
        return None, "table not resolved"
    info = catalog.tables.info(name)
    if info is None or len(info.key) != 1:
        return None, "no single-column primary key or unique NOT NULL key usable"
    if catalog.tables.children.get(name):
        return None, "the table has partitions or inheritance children"
    column, type_oid = info.key[0], info.key_types[0]
    if type_oid not in KEY_TYPES:
        return None, f"key type {type_oid} not supported"
    number = _pinned(tree.args.get("where"), column)
    if number is None:
        return None, f"no top-level equality of {column} to one value (without a cast)"
    uses = sum(1 for p in tree.find_all(exp.Parameter) if _number(p) == number)
    if uses != 1:
        return None, "the key's value is used elsewhere in the statement"
    return Batchable(name, column, type_oid, number, number <= own_params), ""


def _shape(tree: exp.Select) -> str:
    for arg, why in (("with_", "has a WITH"), ("joins", "has a join"), ("limit", "has LIMIT"),
                     ("offset", "has OFFSET"), ("fetch", "has FETCH"), ("group", "has GROUP BY"),
                     ("having", "has HAVING"), ("windows", "has WINDOW"), ("qualify", "has QUALIFY"),
                     ("into", "has INTO"), ("locks", "locks rows"), ("laterals", "has LATERAL")):
        if tree.args.get(arg):
            return why
    distinct = tree.args.get("distinct")
    if isinstance(distinct, exp.Distinct) and distinct.args.get("on") is not None:
        return "has DISTINCT ON"
    for node in tree.walk():
        if node is not tree and isinstance(node, exp.Select | exp.Subquery | exp.Union | exp.Values):
            return "has a subquery"
        if isinstance(node, exp.AggFunc):
            return "has an aggregate"
        if isinstance(node, exp.Window):
            return "has a window function"
    return ""


def _pinned(where: object, column: str) -> int | None:
    """The placeholder number of the one top-level `column = $n` term, when it is the only
    comparison of the column to a placeholder anywhere in the WHERE."""
    if not isinstance(where, exp.Where):
        return None
    top = [n for n in (_equality(t, column) for t in conjuncts(where.this)) if n is not None]
    anywhere = [n for n in (_equality(e, column) for e in where.find_all(exp.EQ)) if n is not None]
    if len(top) != 1 or len(anywhere) != 1:
        return None
    return top[0]


def _equality(node: exp.Expression, column: str) -> int | None:
    """$n of `column = $n` (the column on the left: the batch statement is made by putting
    ANY( ) around the value in the text)."""
    if not isinstance(node, exp.EQ):
        return None
    col, other = node.this, node.expression
    if isinstance(col, exp.Column) and not isinstance(col.this, exp.Star) and _name(col.this) == column \
            and isinstance(other, exp.Parameter):
        return _number(other) or None
    return None


def _name(node: object) -> str:
    if isinstance(node, exp.Identifier):
        text = str(node.this)
        return text if node.quoted else text.lower()
    return ""


def _number(node: exp.Parameter) -> int:
    inner = node.this
    text = str(inner.this) if isinstance(inner, exp.Literal) and not inner.is_string else ""
    return int(text) if text.isdigit() else 0
