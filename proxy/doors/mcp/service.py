"""The MCP tools and resources, run through the pipeline as the calling agent.

Every call takes one of the agent's internal sessions (proxy/pipeline/agents.py, as the gRPC door
does), so it goes through the planner, the role's guardrails, the cache, single-flight and
the pool exactly like a wire client's statement: a `query` repeated by a psql client is a
cache hit here. The door adds its own rules for what cannot work over MCP (more than one
statement, transaction or session state, COPY), bounds every result in rows and bytes
while the rows stream in, and always says when it cut them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote, urlsplit

import mcp_types as types
from mcp.shared.exceptions import MCPError

from planner import Flag, Kind, Plan
from planner.statements import split
from proxy.base.config import AgentAuth
from proxy.doors.mcp.tools import (
    DESCRIBE_TABLE,
    LIST_RESOURCES,
    LIST_SCHEMAS,
    LIST_TABLES,
    QUOTED_NAME,
    SERVED,
    TYPE_NAMES,
    check_arguments,
    compact,
    json_value,
    param_text,
    quote_ident,
    tools,
)
from proxy.pipeline.agents import AgentSessions
from proxy.pipeline.internal import InternalClient, Reply, RowLimit

if TYPE_CHECKING:
    from proxy.pipeline.runtime import Runtime

log = logging.getLogger("pgsluice.mcp")
# what a read may carry and still be cancelled once its rows are cut: nothing it does but
# its rows may be lost by the cancel (a volatile function may write)
_NOT_CANCELLABLE = frozenset({Flag.WRITABLE_CTE, Flag.SELECT_INTO, Flag.LOCKING, Flag.VOLATILE_FUNCTION,
                              Flag.SIDE_EFFECT_FUNCTION, Flag.DANGEROUS_FUNCTION})
_CATALOG_LIMIT = RowLimit(rows=5000, bytes=4 * 1024 * 1024)  # resources/list: names only


class ToolFailure(Exception):
    """A call that ends in an error result: the error's fields, as the agent sees them."""

    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message", ""))
        self.error = error


@dataclass(slots=True)
class Call:
    agent: AgentAuth
    database: str
    client: InternalClient


class McpService:
    """The tools and resources one pgsluice process serves, to every agent and both transports."""

    def __init__(self, server: Runtime) -> None:
        self.server = server
        self.sessions = AgentSessions(server)
        config = server.config
        self.max_rows, self.max_bytes = config.mcp_max_rows, config.mcp_max_bytes
        self.tools = {t.name: t for t in tools(self.max_rows)}
        self._types: dict[tuple[str, int], str] = {}  # (database, type oid) -> SQL name
        self._handlers: dict[str, Callable[[Call, dict[str, Any]], Any]] = {
            "query": self._query, "explain": self._explain, "list_schemas": self._list_schemas,
            "list_tables": self._list_tables, "describe_table": self._describe_table,
            "sample_rows": self._sample_rows}

    # ---- calls ----

    async def call_tool(self, agent: AgentAuth, name: str,
                        args: dict[str, Any] | None) -> types.CallToolResult:
        tool = self.tools.get(name)
        if tool is None:
            return _error_result({"sqlstate": "42883", "message": f"unknown tool {name!r}",
                                  "hint": f"The tools are {', '.join(self.tools)}."})
        args = args or {}
        wrong = check_arguments(tool.input_schema, args)
        if wrong is not None:
            return _error_result({"sqlstate": "22023", "message": f"{name}: {wrong}"})
        try:
            result = await self._with_session(agent, lambda call: self._handlers[name](call, args))
        except ToolFailure as failure:
            return _error_result(failure.error)
        structured = result if isinstance(result, dict) else {"result": result}
        return types.CallToolResult(content=[types.TextContent(text=compact(structured))],
                                    structured_content=structured)

    async def _with_session(self, agent: AgentAuth, work: Callable[[Call], Any]) -> Any:
        database = self.sessions.database(agent)
        client = self.sessions.take(agent, database)
        try:
            result = await work(Call(agent, database, client))
        except ToolFailure:
            self._give_back(agent, database, client)
            raise
        except ConnectionError as exc:  # the session was closed under us (shutdown)
            client.close()
            raise ToolFailure({"sqlstate": "57P01", "message": f"pgsluice: {exc}"}) from None
        except BaseException:
            client.close()
            raise
        self._give_back(agent, database, client)
        return result

    def _give_back(self, agent: AgentAuth, database: str, client: InternalClient) -> None:
        if client.session.backend is not None:  # still holds a server connection: nobody's next
            client.close()
        else:
            self.sessions.give_back(agent, database, client)

    # ---- the pipeline ----

    def _plan(self, call: Call, sql: str) -> Plan:
        """The plan the session will make of `sql` (the same plan-cache entry)."""
        return self.server.planner_for(call.database).analyze(sql, call.client.session.facts)

    def _door_rules(self, plan: Plan, sql: str) -> dict[str, Any] | None:
        """What the MCP door refuses of a statement the role's guardrails let through."""
        if not plan.verdict.allowed:
            return None  # the session refuses it, naming the role's rule
        rule, sqlstate, message = "", "", ""
        if len(split(sql)) > 1:
            rule, sqlstate = "multi_statement", "42601"
            message = "pgsluice: one statement per call (this text has several)"
        elif plan.kind in (Kind.TXN, Kind.SESSION):
            rule, sqlstate = "session_state", "0A000"
            message = ("pgsluice: transaction control and session state (BEGIN, COMMIT, SET, PREPARE, "
                       "LISTEN...) are not available over MCP: each call may run on a different session")
        elif plan.flags & {Flag.COPY_FROM, Flag.COPY_TO}:
            rule, sqlstate = "copy", "0A000"
            message = "pgsluice: COPY is not available over MCP; use SELECT or INSERT"
        if not rule:
            return None
        return {"sqlstate": sqlstate, "message": message, "refused_by": {"rule": rule, "door": "mcp"},
                "executed": False}

    async def _run(self, call: Call, sql: str, params: list[str | None], limit: RowLimit | None,
                   plan: Plan | None = None) -> Reply:
        reply = await call.client.query(sql, params, limit)
        if reply.error is not None:
            raise ToolFailure(self._error(call, reply.error, plan))
        return reply

    def _error(self, call: Call, err: dict[str, str], plan: Plan | None) -> dict[str, Any]:
        out: dict[str, Any] = {"sqlstate": err.get("C", "XX000"), "message": err.get("M", "")}
        for field, key in (("D", "detail"), ("H", "hint"), ("P", "position"), ("W", "where")):
            if err.get(field):
                out[key] = err[field]
        verdict = plan.verdict if plan is not None else None
        if verdict is not None and not verdict.allowed and err.get("M") == verdict.message:
            policy = call.client.session.policy
            out["refused_by"] = {"rule": verdict.rule, "role": policy.name if policy else ""}
            out["executed"] = False  # refused by pgsluice: it never reached Postgres
        return out

    async def _rows(self, call: Call, sql: str, params: list[str | None], max_rows: int,
                    plan: Plan) -> dict[str, Any]:
        """Run a statement; its result bounded in rows and bytes, as the agent sees it."""
        cancel = plan.kind is Kind.READ and plan.statements == 1 and not plan.flags & _NOT_CANCELLABLE
        reply = await self._run(call, sql, params, RowLimit(max_rows, self.max_bytes, cancel), plan)
        types_ = [c.type_oid for c in reply.columns]
        rows, size, cut_bytes = [], 0, False
        for raw in reply.rows:
            row = [json_value(v, t) for v, t in zip(raw, types_, strict=True)]
            size += len(compact(row).encode()) + 1
            if size > self.max_bytes:
                cut_bytes = True
                break
            rows.append(row)
        names = await self._type_names(call, types_)
        columns = [{"name": c.name, "type": t} for c, t in zip(reply.columns, names, strict=True)]
        out: dict[str, Any] = {
            "columns": columns,
            "rows": rows, "row_count": len(rows), "truncated": False,
            "served": SERVED.get(reply.served, "executed"), "command": reply.tag}
        tail = reply.tag.rsplit(" ", 1)[-1]
        if tail.isdigit() and not reply.tag.startswith("SELECT"):
            out["rows_affected"] = int(tail)
        why = self._truncation(call, reply, plan, len(rows), max_rows, cut_bytes)
        if why:
            out["truncated"], out["truncation"] = True, why
        notices = [n.get("M", "") for n in reply.notices]
        if notices:
            out["notices"] = notices
        return out

    def _truncation(self, call: Call, reply: Reply, plan: Plan, kept: int, max_rows: int,
                    cut_bytes: bool) -> str:
        rest = ("the statement was cancelled, so the rest was not read" if reply.cancelled else
                "the statement ran to the end; its other rows were dropped")
        if cut_bytes or (reply.truncated and len(reply.rows) < max_rows):
            return (f"cut after {kept} rows: the result reached the {self.max_bytes}-byte limit "
                    f"(mcp_max_bytes); {rest}. Select fewer or shorter columns, or fewer rows.")
        if reply.truncated:
            return (f"cut after {kept} rows (max_rows {max_rows}); {rest}. Add a WHERE or LIMIT, "
                    "or aggregate, to see what matters.")
        for notice in reply.notices:
            if notice.get("M", "").startswith("pgsluice: result cut at"):
                return notice["M"]
        policy = call.client.session.policy
        if policy is not None and policy.max_rows and kept >= policy.max_rows and \
                any("(max_rows)" in r for r in plan.rewrites):
            return (f"role \"{policy.name}\" returns at most {policy.max_rows} rows "
                    f"(roles.{policy.name}.max_rows): there may be more")
        return ""

    async def _type_names(self, call: Call, oids: list[int]) -> list[str]:
        """SQL's names for the columns' types (as describe_table gives them: integer, text[],
        timestamp with time zone, an enum's own name), looked up once per database."""
        missing = sorted({o for o in oids if (call.database, o) not in self._types})
        if missing:
            literal = "{" + ",".join(map(str, missing)) + "}"
            reply = await call.client.query(TYPE_NAMES, [literal], RowLimit(len(missing), 1 << 20))
            if len(self._types) > 10_000:
                self._types.clear()
            for oid, name in reply.rows if reply.error is None else []:
                if oid is not None and name is not None:
                    self._types[(call.database, int(oid))] = name.decode()
        return [self._types.get((call.database, o), f"oid {o}") for o in oids]

    # ---- tools ----

    async def _query(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        sql: str = args["sql"]
        if "max_staleness" in args:  # the freshness hint the planner reads
            sql = f"/* pgsluice: max_staleness={float(args['max_staleness']):g}s */ {sql}"
        plan = self._plan(call, sql)
        refused = self._door_rules(plan, sql)
        if refused is not None:
            raise ToolFailure(refused)
        params = [param_text(p) for p in args.get("params", [])]
        return await self._rows(call, sql, params, int(args.get("max_rows") or self.max_rows), plan)

    async def _explain(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        sql: str = args["sql"]
        plan = self._plan(call, sql)
        v = plan.verdict
        verdict: dict[str, Any] = {"allowed": v.allowed}
        if not v.allowed:
            verdict.update(rule=v.rule, sqlstate=v.sqlstate, message=v.message, hint=v.hint)
        elif (door := self._door_rules(plan, sql)) is not None:
            verdict.update(allowed=False, rule=door["refused_by"]["rule"], sqlstate=door["sqlstate"],
                           message=door["message"])
        out: dict[str, Any] = {
            "kind": plan.kind.value, "statements": plan.statements, "fingerprint": plan.fingerprint,
            "canonical": plan.canonical, "tables_read": sorted(plan.tables_read),
            "tables_written": sorted(plan.tables_written), "functions": sorted(plan.functions),
            "flags": sorted(f.value for f in plan.flags), "cacheable": plan.cacheable,
            "verdict": verdict}
        if not plan.cacheable:
            out["why_not_cacheable"] = plan.why_not
        if plan.rewrites:
            out["rewrites"], out["runs_as"] = list(plan.rewrites), plan.sql
        if args.get("postgres_plan"):
            text = "EXPLAIN (FORMAT JSON) " + sql
            explain_plan = self._plan(call, text)
            refused = self._door_rules(explain_plan, text)
            params = [param_text(p) for p in args.get("params", [])]
            try:
                if refused is not None:
                    raise ToolFailure(refused)
                reply = await self._run(call, text, params, RowLimit(1, self.max_bytes), explain_plan)
                if reply.truncated:
                    out["postgres_plan_error"] = {"message": f"the plan is larger than {self.max_bytes} "
                                                  "bytes (mcp_max_bytes): left out"}
                elif reply.rows:
                    out["postgres_plan"] = json.loads(reply.rows[0][0] or b"null")
            except ToolFailure as failure:
                out["postgres_plan_error"] = failure.error
        return out

    async def _catalog(self, call: Call, sql: str, params: list[str | None], key: str) -> dict[str, Any]:
        """A catalog read as a list of objects (one per row) under `key`."""
        result = await self._rows(call, sql, params, self.max_rows, self._plan(call, sql))
        names = [c["name"] for c in result.pop("columns")]
        result[key] = [dict(zip(names, row, strict=True)) for row in result.pop("rows")]
        result.pop("command", None)
        return result

    async def _list_schemas(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        return await self._catalog(call, LIST_SCHEMAS, [], "schemas")

    async def _list_tables(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        return await self._catalog(call, LIST_TABLES, [args.get("schema"), args.get("name_like")], "tables")

    async def _describe_table(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        return await self._describe(call, args["table"])

    async def _describe(self, call: Call, table: str) -> dict[str, Any]:
        reply = await self._run(call, DESCRIBE_TABLE, [table], RowLimit(1, 16 * 1024 * 1024),
                                self._plan(call, DESCRIBE_TABLE))
        described: dict[str, Any] = json.loads(reply.rows[0][0] or b"{}")
        described = {k: v for k, v in described.items() if v is not None}
        cut = []
        while len(compact(described)) > self.max_bytes:  # the longest list gives way, from its end
            key = max((k for k, v in described.items() if isinstance(v, list) and v),
                      key=lambda k: len(compact(described[k])), default=None)
            if key is None:
                break
            described[key] = described[key][:len(described[key]) // 2]
            cut.append(key)
        if cut:
            described["truncated"] = True
            described["truncation"] = (f"{', '.join(sorted(set(cut)))} cut to fit {self.max_bytes} bytes "
                                       "(mcp_max_bytes); query pg_catalog for the rest")
        described["served"] = SERVED.get(reply.served, "executed")
        return described

    async def _sample_rows(self, call: Call, args: dict[str, Any]) -> dict[str, Any]:
        named = await self._run(call, QUOTED_NAME, [args["table"]], RowLimit(1, 4096))
        table = (named.rows[0][0] or b"").decode()  # as Postgres quotes it: safe to put in SQL
        limit = int(args.get("limit", 10))
        sql = f"SELECT * FROM {table} LIMIT {limit}"
        result = await self._rows(call, sql, [], min(limit, self.max_rows), self._plan(call, sql))
        return {"table": table, **result}

    # ---- resources: one per table, its description as JSON ----

    async def list_resources(self, agent: AgentAuth) -> types.ListResourcesResult:
        async def work(call: Call) -> list[types.Resource]:
            plan = self._plan(call, LIST_RESOURCES)
            reply = await self._run(call, LIST_RESOURCES, [], _CATALOG_LIMIT, plan)
            out = []
            for schema, name, kind, comment in ([(v or b"").decode() for v in row] for row in reply.rows):
                out.append(types.Resource(
                    uri=f"pgsluice://{quote(call.database, safe='')}/{quote(schema, safe='')}/"
                        f"{quote(name, safe='')}",
                    name=f"{schema}.{name}", title=f"{kind} {schema}.{name}",
                    description=comment or f"{kind} {schema}.{name}: columns, keys, indexes (JSON)",
                    mime_type="application/json"))
            return out

        try:
            return types.ListResourcesResult(resources=await self._with_session(agent, work))
        except ToolFailure as failure:
            raise MCPError(-32603, compact({"error": failure.error})) from None

    async def read_resource(self, agent: AgentAuth, uri: str) -> types.ReadResourceResult:
        parts = urlsplit(uri)
        path = parts.path.split("/")
        database = self.sessions.database(agent)
        if parts.scheme != "pgsluice" or unquote(parts.netloc) != database or len(path) != 3:
            raise MCPError(-32602, f"unknown resource {uri!r}: expected pgsluice://{database}/SCHEMA/TABLE")
        table = quote_ident(unquote(path[1])) + "." + quote_ident(unquote(path[2]))
        try:
            described = await self._with_session(agent, lambda call: self._describe(call, table))
        except ToolFailure as failure:
            raise MCPError(-32603, compact({"error": failure.error})) from None
        return types.ReadResourceResult(contents=[types.TextResourceContents(
            uri=uri, mime_type="application/json", text=compact(described))])


def _error_result(error: dict[str, Any]) -> types.CallToolResult:
    body = {"error": error}
    return types.CallToolResult(content=[types.TextContent(text=compact(body))], structured_content=body,
                                is_error=True)
