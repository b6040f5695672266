"""What the MCP door offers an agent: its tools (names, descriptions and JSON schemas written
for an LLM to read), the checks on their arguments, the catalog SQL behind the schema
tools, and how Postgres values become JSON.

Pure data and functions, no I/O: proxy/doors/mcp/service.py runs them through the pipeline.
"""

from __future__ import annotations

import json
import math
from typing import Any

import mcp_types as types

from protos.pgsluice.v1 import sluice_pb2 as pb
from proxy.pgwire import values

SERVED = {"cache": "cache_hit", "coalesced": "coalesced", "executed": "executed", "batched": "batched"}
SAMPLE_MAX = 100

_JSON_VALUE: dict[str, Any] = {"type": ["string", "number", "boolean", "null"]}
_SQL = {"type": "string", "minLength": 1, "description": "One SQL statement (no trailing second one)."}
_PARAMS = {"type": "array", "items": _JSON_VALUE,
           "description": "Values for $1, $2, ... in order (an array as '{1,2}', JSON as its text)."}
_TABLE = {"type": "string", "minLength": 1,
          "description": "A table or view name as written in SQL, optionally with its schema: "
                         "orders, sales.orders, \"Mixed Case\"."}


def _schema(properties: dict[str, Any], required: tuple[str, ...] = ()) -> dict[str, Any]:
    return {"type": "object", "properties": properties, "required": list(required),
            "additionalProperties": False}


def _tools(max_rows: int) -> list[types.Tool]:
    read = types.ToolAnnotations(read_only_hint=True, open_world_hint=False)
    return [
        types.Tool(
            name="query",
            description=(
                "Run one SQL statement on the PostgreSQL database (through pgsluice: cached, pooled, "
                "guardrailed). Put values in `params` as $1, $2... instead of into the SQL text. "
                "Returns columns with their types, rows as arrays of JSON values (numeric, dates, times "
                "and intervals as strings, json as JSON), row_count, and `truncated`: when true, rows "
                "were cut (see `truncation`) - narrow the query with WHERE or LIMIT, or aggregate. "
                "`served` says whether the answer came from cache. One statement per call; BEGIN, "
                "COMMIT and SET are refused, since each call may run on a different session. A "
                "refused or failed statement returns an error with its SQLSTATE, message, detail, "
                "hint and, for a guardrail, the rule that refused it."),
            input_schema=_schema({
                "sql": _SQL, "params": _PARAMS,
                "max_rows": {"type": "integer", "minimum": 1, "maximum": max_rows,
                             "description": f"Rows to return at most (default and ceiling: {max_rows})."},
                "max_staleness": {"type": "number", "minimum": 0,
                                  "description": "Seconds a cached answer may lag behind writes made "
                                                 "outside pgsluice; 0 asks Postgres afresh."},
            }, ("sql",)),
            output_schema=QUERY_OUTPUT,
            annotations=types.ToolAnnotations(read_only_hint=False, destructive_hint=True,
                                              idempotent_hint=False, open_world_hint=False)),
        types.Tool(
            name="explain",
            description=(
                "Show how pgsluice sees a statement, without running it: kind (read, write, ddl...), "
                "tables read and written, whether its result can be cached (and why not), and "
                "whether your guardrails allow it (and the rule that would refuse it). With "
                "postgres_plan: true, also Postgres's EXPLAIN (FORMAT JSON) plan (planned, not run)."),
            input_schema=_schema({"sql": _SQL, "params": _PARAMS,
                                  "postgres_plan": {"type": "boolean", "default": False,
                                                    "description": "Also ask Postgres for its plan."}},
                                 ("sql",)),
            annotations=read),
        types.Tool(
            name="list_schemas",
            description="List the database's schemas (system schemas left out) with owner, comment "
                        "and number of tables and views. Start here on an unfamiliar database.",
            input_schema=_schema({}), annotations=read),
        types.Tool(
            name="list_tables",
            description=(
                "List tables, views, materialized views and foreign tables with their kind, estimated "
                "row count (Postgres's statistics; null if never analyzed) and comment. Optionally only "
                "one schema, or names matching a LIKE pattern such as 'order%'."),
            input_schema=_schema({
                "schema": {"type": "string", "minLength": 1, "description": "Only this schema."},
                "name_like": {"type": "string", "minLength": 1,
                              "description": "SQL LIKE pattern on the name ('%' any text, '_' one "
                                             "character)."},
            }), annotations=read),
        types.Tool(
            name="describe_table",
            description=(
                "Describe one table or view: columns (type, nullable, default, comment), primary key, "
                "unique constraints, foreign keys in both directions (what it references and what "
                "references it: the join paths), check constraints, indexes and comment."),
            input_schema=_schema({"table": _TABLE}, ("table",)), annotations=read),
        types.Tool(
            name="sample_rows",
            description="A few rows of a table or view (the first Postgres reads, in no particular "
                        "order), to see what its data looks like before writing a query.",
            input_schema=_schema({
                "table": _TABLE,
                "limit": {"type": "integer", "minimum": 1, "maximum": SAMPLE_MAX, "default": 10,
                          "description": "How many rows (default 10)."},
            }, ("table",)), annotations=read),
    ]


QUERY_OUTPUT: dict[str, Any] = {
    "type": "object",
    "properties": {
        "columns": {"type": "array", "items": {
            "type": "object", "properties": {"name": {"type": "string"}, "type": {"type": "string"}},
            "required": ["name", "type"]}},
        "rows": {"type": "array", "items": {"type": "array"}},
        "row_count": {"type": "integer", "description": "Rows in `rows`."},
        "truncated": {"type": "boolean", "description": "True when rows were cut: see `truncation`."},
        "truncation": {"type": "string", "description": "What cut the rows, and what to do about it."},
        "served": {"type": "string", "enum": sorted(SERVED.values())},
        "command": {"type": "string", "description": "Postgres's command tag, e.g. SELECT 3, INSERT 0 1."},
        "rows_affected": {"type": "integer"},
        "notices": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["columns", "rows", "row_count", "truncated", "served", "command"],
}


def tools(max_rows: int) -> list[types.Tool]:
    return _tools(max_rows)


# ---- arguments ----------------------------------------------------------------------------------

_TYPES: dict[str, tuple[type, ...]] = {"string": (str,), "integer": (int,), "number": (int, float),
                                       "boolean": (bool,), "array": (list,), "object": (dict,),
                                       "null": (type(None),)}


def check_arguments(schema: dict[str, Any], args: dict[str, Any]) -> str | None:
    """What is wrong with `args` under one of our (flat) input schemas; None if nothing."""
    props: dict[str, Any] = schema["properties"]
    for name in args:
        if name not in props:
            return f"unknown argument {name!r} (known: {', '.join(props) or 'none'})"
    for name in schema["required"]:
        if name not in args:
            return f"missing argument {name!r}"
    for name, value in args.items():
        spec = props[name]
        kinds = spec.get("type", [])
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if kinds and not any(_is(value, k) for k in kinds):
            return f"argument {name!r} must be of type {' or '.join(kinds)}"
        if isinstance(value, str) and len(value) < spec.get("minLength", 0):
            return f"argument {name!r} must not be empty"
        if isinstance(value, int | float) and not isinstance(value, bool):
            if "minimum" in spec and value < spec["minimum"]:
                return f"argument {name!r} must be at least {spec['minimum']}"
            if "maximum" in spec and value > spec["maximum"]:
                return f"argument {name!r} must be at most {spec['maximum']}"
            if not math.isfinite(value):
                return f"argument {name!r} must be a finite number"
    return None


def _is(value: Any, kind: str) -> bool:
    if isinstance(value, bool):
        return kind == "boolean"
    if kind == "integer" and isinstance(value, float):
        return value.is_integer()
    return isinstance(value, _TYPES[kind])


def param_text(value: Any) -> str | None:
    """A JSON argument as the text Postgres parses for a parameter (None: NULL)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value)) if abs(value) < 2**53 else repr(value)
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list):
        return "{" + ",".join(_element(v) for v in value) + "}"
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def _element(value: Any) -> str:
    if isinstance(value, list):
        return param_text(value) or "NULL"
    text = param_text(value)
    if text is None:
        return "NULL"
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


# ---- values -------------------------------------------------------------------------------------

_INTS = frozenset({20, 21, 23, 26})
_FLOATS = frozenset({700, 701})
_JSON = frozenset({114, 3802})


def json_value(raw: bytes | None, oid: int) -> Any:
    """A text-format Postgres value as JSON: numbers and booleans as such, json as JSON,
    arrays as lists, anything else (numeric, dates, times, bytea as \\x hex...) as its text."""
    if raw is None:
        return None
    if oid == 16:
        return raw == b"t"
    if oid in _INTS:
        return int(raw)
    if oid in _FLOATS:
        number = float(raw)
        return number if math.isfinite(number) else raw.decode()  # NaN, Infinity: not JSON
    if oid in _JSON:
        return json.loads(raw)
    if oid in values.ARRAY_ELEMENTS:
        return _plain(values.decode(raw, oid))
    return raw.decode("utf-8", "replace")


def _plain(value: pb.Value) -> Any:
    kind = value.WhichOneof("kind")
    if kind is None or kind == "null":
        return None
    if kind == "array":
        return [_plain(v) for v in value.array.values]
    if kind == "bytea":
        return "\\x" + value.bytea.hex()
    if kind == "double":
        return value.double if math.isfinite(value.double) else str(value.double)
    if kind == "json":
        return json.loads(value.json)
    if kind == "other":
        return value.other.text
    return getattr(value, kind)


def compact(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


# ---- catalog SQL (each one statement sqlglot parses, so read-only roles may run it) ------------

LIST_SCHEMAS = """SELECT n.nspname AS schema, pg_catalog.pg_get_userbyid(n.nspowner) AS owner,
  pg_catalog.obj_description(n.oid, 'pg_namespace') AS comment,
  (SELECT count(*) FROM pg_catalog.pg_class c
   WHERE c.relnamespace = n.oid AND c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition) AS tables
FROM pg_catalog.pg_namespace n
WHERE n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
ORDER BY n.nspname"""

_KIND = """CASE c.relkind WHEN 'r' THEN 'table' WHEN 'p' THEN 'partitioned table' WHEN 'v' THEN 'view'
  WHEN 'm' THEN 'materialized view' WHEN 'f' THEN 'foreign table' END"""

# reltuples is live statistics: this one is never cached (LIST_RESOURCES, without it, is)
LIST_TABLES = f"""SELECT n.nspname AS schema, c.relname AS name, {_KIND} AS kind,
  CASE WHEN c.reltuples < 0 THEN NULL ELSE c.reltuples::bigint END AS row_estimate,
  pg_catalog.obj_description(c.oid, 'pg_class') AS comment
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition
  AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
  AND ($1::text IS NULL OR n.nspname = $1::text) AND ($2::text IS NULL OR c.relname LIKE $2::text)
ORDER BY n.nspname, c.relname"""

LIST_RESOURCES = f"""SELECT n.nspname AS schema, c.relname AS name, {_KIND} AS kind,
  pg_catalog.obj_description(c.oid, 'pg_class') AS comment
FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p', 'v', 'm', 'f') AND NOT c.relispartition
  AND n.nspname NOT LIKE 'pg\\_%' AND n.nspname <> 'information_schema'
ORDER BY n.nspname, c.relname"""

QUOTED_NAME = "SELECT $1::regclass::text AS name"

_COLUMNS_OF = """(SELECT json_agg(a.attname ORDER BY array_position(k.conkey, a.attnum))
    FROM pg_catalog.pg_attribute a WHERE a.attrelid = k.conrelid AND a.attnum = ANY (k.conkey))"""

DESCRIBE_TABLE = f"""SELECT json_build_object(
  'table', (SELECT n.nspname || '.' || c.relname FROM pg_catalog.pg_namespace n WHERE n.oid = c.relnamespace),
  'kind', {_KIND},
  'comment', pg_catalog.obj_description(c.oid, 'pg_class'),
  'columns', (SELECT json_agg(json_build_object(
      'name', a.attname, 'type', pg_catalog.format_type(a.atttypid, a.atttypmod),
      'nullable', NOT a.attnotnull, 'default', pg_catalog.pg_get_expr(d.adbin, d.adrelid),
      'comment', pg_catalog.col_description(c.oid, a.attnum))
      ORDER BY a.attnum)
    FROM pg_catalog.pg_attribute a
    LEFT JOIN pg_catalog.pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped),
  'primary_key', (SELECT {_COLUMNS_OF} FROM pg_catalog.pg_constraint k
    WHERE k.conrelid = c.oid AND k.contype = 'p'),
  'unique', (SELECT json_agg(json_build_object('name', k.conname, 'columns', {_COLUMNS_OF})
      ORDER BY k.conname)
    FROM pg_catalog.pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'u'),
  'foreign_keys', (SELECT json_agg(json_build_object('name', k.conname, 'columns', {_COLUMNS_OF},
      'references', k.confrelid::regclass::text, 'definition', pg_catalog.pg_get_constraintdef(k.oid))
      ORDER BY k.conname)
    FROM pg_catalog.pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'f'),
  'referenced_by', (SELECT json_agg(json_build_object('name', k.conname, 'table', k.conrelid::regclass::text,
      'definition', pg_catalog.pg_get_constraintdef(k.oid)) ORDER BY k.conrelid::regclass::text, k.conname)
    FROM pg_catalog.pg_constraint k WHERE k.confrelid = c.oid AND k.contype = 'f'),
  'checks', (SELECT json_agg(json_build_object('name', k.conname,
      'definition', pg_catalog.pg_get_constraintdef(k.oid)) ORDER BY k.conname)
    FROM pg_catalog.pg_constraint k WHERE k.conrelid = c.oid AND k.contype = 'c'),
  'indexes', (SELECT json_agg(json_build_object('name', i.relname, 'unique', x.indisunique,
      'primary', x.indisprimary, 'definition', pg_catalog.pg_get_indexdef(x.indexrelid)) ORDER BY i.relname)
    FROM pg_catalog.pg_index x JOIN pg_catalog.pg_class i ON i.oid = x.indexrelid WHERE x.indrelid = c.oid)
) AS description
FROM pg_catalog.pg_class c WHERE c.oid = $1::regclass"""

TYPE_NAMES = ("SELECT t.oid::int8 AS oid, pg_catalog.format_type(t.oid, NULL) AS name "
              "FROM pg_catalog.pg_type t WHERE t.oid = ANY ($1::oid[])")


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
