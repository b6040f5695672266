"""Small readers over sqlglot's trees, shared by the planner's analyses (walk, reader, reach):
identifiers folded the way Postgres folds them, a table's schema and name, whether a name is a
visible WITH query, a function call's Postgres name, and which tree a statement's leading
keyword calls for (a tree of another type is one of sqlglot's fallbacks, not trusted).
"""

from __future__ import annotations

from typing import cast

import sqlglot
from sqlglot import exp

from .normalize import ascii_lower

# Past this many characters a statement is not handed to sqlglot (about 1.5 us per character:
# a bulk INSERT would stall the event loop); it is read from its keywords. Same limit as the
# Planner's MAX_PARSE.
MAX_PARSE = 16 * 1024
DML = (exp.Insert, exp.Update, exp.Delete, exp.Merge)
# The sqlglot tree a statement must have for its tables and functions to be read from it.
TREE_FOR: dict[str, tuple[type, ...]] = {
    "select": (exp.Query,), "values": (exp.Query, exp.Values), "table": (exp.Query,),
    "with": (exp.Query, *DML), "insert": (exp.Insert,), "update": (exp.Update,),
    "delete": (exp.Delete,), "merge": (exp.Merge,), "create": (exp.Create,), "alter": (exp.Alter,),
    "drop": (exp.Drop,), "truncate": (exp.TruncateTable,), "comment": (exp.Comment,),
    "grant": (exp.Grant,), "revoke": (exp.Revoke,),
}
# sqlglot's names for built-ins whose Postgres name differs (for `functions` and pg_proc).
TYPED_NAMES = {
    "CurrentTimestamp": "now", "Rand": "random", "Uuid": "gen_random_uuid", "ArrayConcat": "array_cat",
    "ArraySize": "array_length", "BitwiseAndAgg": "bit_and", "BitwiseOrAgg": "bit_or",
    "BitwiseXorAgg": "bit_xor", "CurrentVersion": "version", "Explode": "unnest",
    "ExplodingGenerateSeries": "generate_series", "GenerateSeries": "generate_series", "Getbit": "get_bit",
    "GroupConcat": "string_agg", "Hex": "to_hex", "JSONArrayAgg": "json_agg",
    "JSONBObjectAgg": "jsonb_object_agg", "JSONObject": "json_object", "JSONObjectAgg": "json_object_agg",
    "LogicalAnd": "bool_and", "LogicalOr": "bool_or", "Pad": "lpad", "SHA2Digest": "sha256",
    "StrPosition": "strpos", "StrToDate": "to_date", "StrToTime": "to_timestamp",
    "TimeFromParts": "make_time", "TimeToStr": "to_char", "TimestampFromParts": "make_timestamp",
    "TimestampTrunc": "date_trunc",
    "Trim": "btrim", "UnixToTime": "to_timestamp", "VariancePop": "var_pop", "CurrentDate": "current_date",
    "CurrentTime": "current_time", "Localtime": "localtime", "Localtimestamp": "localtimestamp",
    "CurrentUser": "current_user", "SessionUser": "session_user", "CurrentSchema": "current_schema",
    "CurrentCatalog": "current_database", "CurrentDatabase": "current_database",
    "CurrentSchemas": "current_schemas",
}  # fmt: skip


def parse_trees(sql: str) -> list[exp.Expression] | None:
    """sqlglot's trees for a text (one per statement); None if it is too long or fails."""
    if len(sql) > MAX_PARSE:
        return None
    try:
        trees = sqlglot.parse(sql, read="postgres")
    except Exception:  # sqlglot raises more than ParseError on odd input
        return None
    return [cast(exp.Expression, t) for t in trees if t is not None]


def ident(node: object) -> str:
    """An identifier as Postgres reads it: unquoted ones fold to lower case (ASCII only)."""
    if isinstance(node, exp.Identifier):
        text = str(node.this)
        return text if node.quoted else ascii_lower(text)
    if isinstance(node, str):
        return ascii_lower(node)
    return ""


def table_parts(table: exp.Table) -> list[str] | None:
    """[schema, name] or [name] of a table reference; None if it names no relation."""
    name = ident(table.this)
    if not name:
        return None
    db = table.args.get("db")
    return [ident(db), name] if db is not None and ident(db) else [name]


def function_name(fn: exp.Func) -> str:
    """The Postgres name of a call sqlglot gave a class of its own ("" if it has none)."""
    return TYPED_NAMES.get(type(fn).__name__) or _sql_name(fn)


def _sql_name(fn: exp.Func) -> str:
    try:
        return type(fn).sql_name().lower()
    except Exception:  # classes without a SQL name
        return ""


def with_names(node: exp.Expr) -> tuple[exp.With | None, list[str]]:
    with_ = node.args.get("with_") or node.args.get("with")
    if not isinstance(with_, exp.With):
        return None, []
    return with_, [cte_name(cte) for cte in with_.expressions]


def cte_name(cte: exp.Expression) -> str:
    alias = cte.args.get("alias")
    return ident(alias.this) if isinstance(alias, exp.TableAlias) else ""


def is_cte(table: exp.Table, name: str) -> bool:
    """Is this unqualified table name a reference to a WITH query visible where it is used?
    A CTE sees the CTEs before it in its WITH (and itself and all of them if RECURSIVE);
    the statement's body sees all of them."""
    node: exp.Expr = table
    parent = node.parent
    while parent is not None:
        if isinstance(node, exp.CTE) and isinstance(parent, exp.With):
            names = [cte_name(c) for c in parent.expressions]
            idx = next((k for k, c in enumerate(parent.expressions) if c is node), len(names))
            visible = names if parent.args.get("recursive") else names[:idx]
            if name in visible:
                return True
            owner = parent.parent
            if owner is None:
                return False
            node, parent = owner, owner.parent  # the owner's WITH is done
            continue
        if not isinstance(node, exp.With):
            with_, names = with_names(parent)
            if with_ is not None and with_ is not node and name in names:
                return True
        node, parent = parent, parent.parent
    return False
