"""The gRPC door: `pgsluice.v1.Sluice` on `grpc_listen`, plus grpc.health.v1 and reflection.

Every call goes through an InternalClient (proxy/internal.py), so it shares the planner,
guardrails, cache, single-flight and pool with the wire door; a query cached by a psql
client is a hit for a gRPC agent with the same role and settings, and the other way round.
Agents authenticate with `authorization: Bearer <token>` ([pgsluice.agents.NAME] in the
config); Postgres errors come back as gRPC status codes with the SQLSTATE, message,
detail, hint and position in the trailing metadata (`pgsluice-sqlstate`, ...).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cache.deps import write_names
from planner import SessionFacts
from planner.explain import describe
from planner.tables import Effect
from protos.pgsluice.v1 import sluice_pb2 as pb
from protos.pgsluice.v1 import sluice_pb2_grpc

from . import values
from .agents import AgentSessions, agent_for_token, bearer_token
from .config import AgentAuth
from .idempotency import Idempotency
from .internal import InternalClient, Reply
from .snapshot import view
from .stats import quantile

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("pgsluice.grpc")
Ctx = grpc.aio.ServicerContext[Any, Any]
SERVICE = "pgsluice.v1.Sluice"
BATCH_CONCURRENCY = 32  # statements of one Batch in flight at once
_SERVED = {"executed": pb.EXECUTED, "cache": pb.CACHE_HIT, "coalesced": pb.COALESCED}
_BY_SQLSTATE = {
    # a Bind the request made wrong (a parameter count): the caller's mistake, not a lost link
    "08P01": grpc.StatusCode.INVALID_ARGUMENT, "3D000": grpc.StatusCode.NOT_FOUND,
    "42501": grpc.StatusCode.PERMISSION_DENIED, "25006": grpc.StatusCode.PERMISSION_DENIED,
    "23505": grpc.StatusCode.ALREADY_EXISTS, "57014": grpc.StatusCode.CANCELLED,
    "53300": grpc.StatusCode.RESOURCE_EXHAUSTED, "57P01": grpc.StatusCode.UNAVAILABLE,
    "28P01": grpc.StatusCode.UNAUTHENTICATED, "28000": grpc.StatusCode.UNAUTHENTICATED,
}
_BY_CLASS = {
    "08": grpc.StatusCode.UNAVAILABLE, "22": grpc.StatusCode.INVALID_ARGUMENT,
    "23": grpc.StatusCode.FAILED_PRECONDITION, "25": grpc.StatusCode.FAILED_PRECONDITION,
    "40": grpc.StatusCode.ABORTED, "42": grpc.StatusCode.INVALID_ARGUMENT,
    "53": grpc.StatusCode.RESOURCE_EXHAUSTED, "54": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "57": grpc.StatusCode.UNAVAILABLE, "XX": grpc.StatusCode.INTERNAL,
}


def status_for(sqlstate: str, timed_out: bool = False) -> grpc.StatusCode:
    if sqlstate == "57014" and timed_out:
        return grpc.StatusCode.DEADLINE_EXCEEDED
    return _BY_SQLSTATE.get(sqlstate) or _BY_CLASS.get(sqlstate[:2], grpc.StatusCode.UNKNOWN)


class SluiceService(sluice_pb2_grpc.SluiceServicer):
    def __init__(self, server: Server) -> None:
        self.server = server
        self.sessions = AgentSessions(server)  # agents.py: idle internal sessions per agent
        redis = server.cache.redis if server.cache is not None else None
        self.idempotency = Idempotency(server.config.idempotency_window, redis)
        self.batch_gate = asyncio.Semaphore(max(1, server.config.pool_max_size // 2))

    # ---- plumbing ----

    async def _agent(self, context: Ctx) -> AgentAuth:
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                token = bearer_token(value)
                agent = agent_for_token(self.server.config.agents, token) if token else None
                if agent is not None:
                    return agent
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "pgsluice: missing or unknown bearer token")
        raise AssertionError("unreachable")

    def _database(self, agent: AgentAuth, requested: str) -> str:
        return self.sessions.database(agent, requested)

    def _take(self, agent: AgentAuth, database: str) -> InternalClient:
        return self.sessions.take(agent, database)

    def _give_back(self, agent: AgentAuth, database: str, client: InternalClient) -> None:
        self.sessions.give_back(agent, database, client)

    async def _run(self, agent: AgentAuth, database: str, sql: str, params: list[str | None],
                   timeout: float = 0.0) -> tuple[Reply, bool]:
        client = self._take(agent, database)
        timed_out = False
        try:
            task = asyncio.ensure_future(client.query(sql, params))
            if timeout > 0:
                done, _ = await asyncio.wait({task}, timeout=timeout)
                if not done:  # cancel the statement (or the wait for an identical one)
                    timed_out = True
                    await self.server.cancel(*client.session.key)
            reply = await task
        except BaseException:
            client.close()
            raise
        self._give_back(agent, database, client)
        return reply, timed_out

    @staticmethod
    async def _fail(context: Ctx, error: dict[str, str], timed_out: bool) -> None:
        """Abort with the status for the SQLSTATE; the error's fields go both in the standard
        rich status details (google.rpc.ErrorInfo, domain "postgresql", reason = SQLSTATE) and
        in plain trailing metadata for clients without the status helpers."""
        code = error.get("C", "XX000")
        status = status_for(code, timed_out)
        fields = {key: error[f] for f, key in (("M", "message"), ("D", "detail"), ("H", "hint"),
                                                  ("P", "position")) if error.get(f)}
        info = error_details_pb2.ErrorInfo(reason=code, domain="postgresql", metadata=fields)
        detail = any_pb2.Any()
        detail.Pack(info)
        rich = status_pb2.Status(code=status.value[0], message=f"{code}: {error.get('M', '')}",
                                 details=[detail])
        trailers: list[tuple[str, str | bytes]] = [("pgsluice-sqlstate", code)]
        for key in ("message", "detail", "hint"):
            if key in fields:
                trailers.append((f"pgsluice-{key}-bin", fields[key].encode()))
        if "position" in fields:
            trailers.append(("pgsluice-position", fields["position"]))
        trailers.append(("grpc-status-details-bin", rich.SerializeToString()))
        await context.abort(status, rich.message, trailing_metadata=tuple(trailers))

    # ---- RPCs ----

    async def Query(self, request: pb.QueryRequest, context: Ctx) -> pb.QueryResponse:
        agent = await self._agent(context)
        database = self._database(agent, request.database)
        failure: list[tuple[dict[str, str], bool]] = []

        async def work() -> bytes | None:
            outcome, reply, timed_out = await self._execute(agent, database, request)
            if reply.error is not None:
                failure.append((reply.error, timed_out))
                return None
            assert isinstance(outcome, pb.QueryResponse)
            return bytes(outcome.SerializeToString())

        if request.idempotency_key:
            stored = await self.idempotency.run(f"{agent.name}:{request.idempotency_key}", work)
        else:
            stored = await work()
        if stored is None:
            error, timed_out = failure[0]
            await self._fail(context, error, timed_out)
        assert stored is not None
        return pb.QueryResponse.FromString(stored)

    async def _execute(self, agent: AgentAuth, database: str, request: pb.QueryRequest,
                       client: InternalClient | None = None
                       ) -> tuple[pb.QueryResponse | pb.Error, Reply, bool]:
        """Run one statement (on `client`, or on one taken from the idle ones)."""
        sql = _hinted(request)
        hints = request.hints
        params = [values.encode(v) for v in request.params]
        started = time.perf_counter()
        if client is None and hints.priority == pb.BATCH:
            async with self.batch_gate:
                reply, timed_out = await self._run(agent, database, sql, params, hints.timeout_seconds)
        elif client is None:
            reply, timed_out = await self._run(agent, database, sql, params, hints.timeout_seconds)
        else:
            reply, timed_out = await client.query(sql, params), False
        if reply.error is not None:
            err = reply.error
            return pb.Error(sqlstate=err.get("C", ""), message=err.get("M", ""), detail=err.get("D", ""),
                            hint=err.get("H", ""), position=err.get("P", ""),
                            status_code=status_for(err.get("C", ""), timed_out).value[0]), reply, timed_out
        rows = reply.rows
        truncated = bool(hints.max_rows) and len(rows) > hints.max_rows
        if truncated:
            rows = rows[:hints.max_rows]
        types = [c.type_oid for c in reply.columns]
        tail = reply.tag.rsplit(" ", 1)[-1]
        plan = self.server.planner_for(database).analyze(request.sql, SessionFacts(database, agent.user))
        return pb.QueryResponse(
            columns=[pb.Column(name=c.name, type_oid=c.type_oid, type_name=values.type_name(c.type_oid))
                     for c in reply.columns],
            rows=[pb.Row(values=[values.decode(v, t) for v, t in zip(row, types, strict=True)])
                  for row in rows],
            command_tag=reply.tag, rows_affected=int(tail) if tail.isdigit() else 0,
            served=_SERVED.get(reply.served, pb.EXECUTED), elapsed_ms=(time.perf_counter() - started) * 1000,
            fingerprint=plan.fingerprint, truncated=truncated), reply, timed_out

    async def QueryStream(self, request: pb.QueryRequest, context: Ctx) -> AsyncIterator[pb.QueryChunk]:
        agent = await self._agent(context)
        database = self._database(agent, request.database)
        sql = _hinted(request)
        client = self._take(agent, database)
        types: list[int] = []
        sent = 0
        limit = request.hints.max_rows
        ended = False
        try:
            async for kind, payload in client.stream(sql, [values.encode(v) for v in request.params]):
                if kind == "columns":
                    types = [c.type_oid for c in payload]
                    yield pb.QueryChunk(columns=[pb.Column(name=c.name, type_oid=c.type_oid,
                                                           type_name=values.type_name(c.type_oid))
                                                 for c in payload])
                elif kind == "rows":
                    rows = payload if not limit else payload[:max(0, limit - sent)]
                    sent += len(rows)
                    if rows:
                        yield pb.QueryChunk(rows=[_row(row, types) for row in rows])
                else:
                    ended = True
                    if payload.error is not None:
                        await self._fail(context, payload.error, False)
                    served = _SERVED.get(payload.served, pb.EXECUTED)
                    yield pb.QueryChunk(command_tag=payload.tag, served=served)
        finally:
            if ended:
                self._give_back(agent, database, client)
            else:
                client.close()

    async def Batch(self, request: pb.BatchRequest, context: Ctx) -> pb.BatchResponse:
        agent = await self._agent(context)
        default = self._database(agent, request.database)
        if request.transaction:
            return await self._transaction(agent, request, default)
        gate = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def one(statement: pb.QueryRequest) -> pb.BatchItem:
            async with gate:
                outcome, _, _ = await self._execute(agent, statement.database or default, statement)
            return _item(outcome)

        items = await asyncio.gather(*(one(st) for st in request.statements))
        return pb.BatchResponse(items=items)

    async def _transaction(self, agent: AgentAuth, request: pb.BatchRequest,
                           database: str) -> pb.BatchResponse:
        if any(st.database and st.database != database for st in request.statements):
            return pb.BatchResponse(items=[_item(pb.Error(
                sqlstate="0A000", message="a transaction batch runs in one database",
                status_code=grpc.StatusCode.INVALID_ARGUMENT.value[0]))] * len(request.statements))
        client = self._take(agent, database)
        items: list[pb.BatchItem] = []
        try:
            begin = await client.query("BEGIN")
            failed = begin.error is not None
            for statement in request.statements:
                if failed:
                    items.append(_item(pb.Error(
                        sqlstate="25P02", message="not run: an earlier statement of the transaction failed",
                        status_code=grpc.StatusCode.ABORTED.value[0])))
                    continue
                outcome, reply, _ = await self._execute(agent, database, statement, client)
                items.append(_item(outcome))
                failed = reply.error is not None
            end = await client.query("ROLLBACK" if failed else "COMMIT")
            committed = not failed and end.error is None and end.tag == "COMMIT"
        except BaseException:
            client.close()
            raise
        self._give_back(agent, database, client)
        return pb.BatchResponse(items=items, committed=committed)

    async def Explain(self, request: pb.ExplainRequest, context: Ctx) -> pb.ExplainResponse:
        agent = await self._agent(context)
        database = self._database(agent, request.database)
        plan = self.server.planner_for(database).analyze(request.sql, SessionFacts(database, agent.user))
        v = plan.verdict
        out = pb.ExplainResponse(
            fingerprint=plan.fingerprint, canonical_sql=plan.canonical, kind=plan.kind.value,
            cacheable=plan.cacheable, why_not=plan.why_not, tables_read=sorted(plan.tables_read),
            tables_written=sorted(plan.tables_written), text=describe(plan),
            verdict="allow" if v.allowed else f"reject {v.sqlstate} [{v.rule}] {v.message}")
        if request.postgres_explain:
            reply, _ = await self._run(agent, database, "EXPLAIN (FORMAT JSON) " + request.sql, [])
            if reply.error is not None:
                await self._fail(context, reply.error, False)
            out.postgres_plan_json = (reply.rows[0][0] or b"").decode() if reply.rows else ""
        return out

    async def Invalidate(self, request: pb.InvalidateRequest,
                         context: Ctx) -> pb.InvalidateResponse:
        agent = await self._agent(context)
        database = self._database(agent, request.database)
        cache = self.server.cache
        tables = list(request.tables) or ["*"]
        if cache is not None:
            # a name not qualified by its schema may be any table: the whole database
            effects = [Effect("*" if "." not in t else t, "table") for t in tables]
            task = cache.bump(write_names(database, effects, None))
            if task is not None:
                await task
        return pb.InvalidateResponse(tables=len(tables))

    async def Stats(self, request: pb.StatsRequest, context: Ctx) -> pb.StatsResponse:
        await self._agent(context)
        v = view(self.server)
        agents = [pb.AgentStats(agent=name, queries=a["queries"], hits=a["hits"], coalesced=a["coalesced"],
                                misses=a["misses"], bypassed=a["bypassed"], rejected=a["rejected"],
                                p50_ms=(quantile(a["lat_counts"], 0.5) or 0) * 1000,
                                p99_ms=(quantile(a["lat_counts"], 0.99) or 0) * 1000)
                  for name, a in sorted(v["agents"].items())]
        cache = v.get("cache") or {}
        return pb.StatsResponse(agents=agents, upstream_queries=v["totals"]["upstream_queries"],
                                cache_hits=sum(a.hits for a in agents), cache_entries=cache.get("entries", 0),
                                cache_bytes=cache.get("bytes", 0))


def _hinted(request: pb.QueryRequest) -> str:
    """The statement with its freshness hint as the comment the planner reads."""
    if request.hints.HasField("max_staleness_seconds"):
        return f"/* pgsluice: max_staleness={request.hints.max_staleness_seconds}s */ {request.sql}"
    return request.sql


def _row(row: list[bytes | None], types: list[int]) -> pb.Row:
    return pb.Row(values=[values.decode(v, t) for v, t in zip(row, types, strict=True)])


def _item(outcome: pb.QueryResponse | pb.Error) -> pb.BatchItem:
    if isinstance(outcome, pb.Error):
        return pb.BatchItem(error=outcome)
    return pb.BatchItem(result=outcome)


class _DecodeRequests(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """A request that does not decode (bad protobuf, invalid UTF-8 in a string) gets
    INVALID_ARGUMENT instead of grpc's UNKNOWN: each unary-request method decodes its own."""

    async def intercept_service(self, continuation: Any, details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler
        decode = handler.request_deserializer

        async def request(raw: bytes, context: Ctx) -> Any:
            try:
                return decode(raw)
            except Exception as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                    f"pgsluice: the request could not be decoded ({type(exc).__name__})")

        if handler.unary_unary is not None:
            behavior = handler.unary_unary

            async def unary_unary(raw: bytes, context: Ctx) -> Any:
                return await behavior(await request(raw, context), context)

            return handler._replace(request_deserializer=None, unary_unary=unary_unary)
        stream = handler.unary_stream

        async def unary_stream(raw: bytes, context: Ctx) -> AsyncIterator[Any]:
            async for item in stream(await request(raw, context), context):
                yield item

        return handler._replace(request_deserializer=None, unary_stream=unary_stream)


class GrpcDoor:
    def __init__(self, server: Server) -> None:
        self.server = server
        self.grpc = grpc.aio.server(interceptors=[_DecodeRequests()], options=[
            ("grpc.max_receive_message_length", server.config.max_message_size),
            ("grpc.max_send_message_length", server.config.max_message_size),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)])
        sluice_pb2_grpc.add_SluiceServicer_to_server(SluiceService(server), self.grpc)  # type: ignore[no-untyped-call]
        self.health = health.aio.HealthServicer()  # type: ignore[attr-defined]
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.grpc)
        names = (pb.DESCRIPTOR.services_by_name["Sluice"].full_name,
                 health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.grpc)
        self.port = 0
        self._checker: asyncio.Task[None] | None = None

    def _credentials(self) -> grpc.ServerCredentials | None:
        """TLS from the wire door's files (tls_ca: client certificates required); None: plain."""
        c = self.server.config
        if not c.tls_cert or c.tls_mode == "disable":
            return None
        with open(c.tls_key, "rb") as key, open(c.tls_cert, "rb") as cert:
            pair = (key.read(), cert.read())
        ca = None
        if c.tls_ca:
            with open(c.tls_ca, "rb") as f:
                ca = f.read()
        return grpc.ssl_server_credentials([pair], root_certificates=ca, require_client_auth=ca is not None)

    async def start(self, listen: str) -> None:
        credentials = self._credentials()
        self.port = (self.grpc.add_secure_port(listen, credentials) if credentials is not None
                     else self.grpc.add_insecure_port(listen))
        if not self.port:
            raise OSError(f"cannot listen on {listen}")
        await self.grpc.start()
        self._checker = asyncio.get_running_loop().create_task(self._check())
        log.info("gRPC door on %s%s", listen, " (TLS)" if credentials is not None else "")

    async def _check(self) -> None:
        """NOT_SERVING while Postgres cannot be reached."""
        while True:
            try:
                async with asyncio.timeout(2):
                    conn = await self.server._connect(self.server.admin_database())
                    await conn.close()
                status = health_pb2.HealthCheckResponse.SERVING
            except Exception:
                status = health_pb2.HealthCheckResponse.NOT_SERVING
            for name in ("", SERVICE):
                await self.health.set(name, status)
            await asyncio.sleep(1.0)

    async def stop(self, grace: float) -> None:
        if self._checker is not None:
            self._checker.cancel()
        await self.grpc.stop(grace)
