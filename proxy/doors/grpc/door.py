"""The gRPC door: `pgsluice.v1.Sluice` on `grpc_listen`, plus grpc.health.v1 and reflection.

Every call goes through an InternalClient (proxy/pipeline/internal.py), so it shares the planner,
guardrails, cache, single-flight and pool with the wire door; a query cached by a psql
client is a hit for a gRPC agent with the same role and settings, and the other way round.
Agents authenticate with `authorization: Bearer <token>` ([pgsluice.agents.NAME] in the
config); Postgres errors come back as gRPC status codes with the SQLSTATE, message,
detail, hint and position in the trailing metadata (`pgsluice-sqlstate`, ...).

Query, Batch and Session replies are written as bytes by proxy/doors/grpc/wire.py from the wire
messages the pipeline produced (no protobuf objects per row); the Session stream lives in
proxy/doors/grpc/session.py. Each method decodes its own request, so one that does not decode is
INVALID_ARGUMENT (a Session request: an error reply, the stream goes on).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from cache.deps import write_names
from planner import Flag, Plan
from planner.explain import describe
from planner.tables import Effect
from protos.pgsluice.v1 import sluice_pb2 as pb
from proxy.base.config import AgentAuth
from proxy.base.stats import quantile
from proxy.doors.grpc import wire as grpc_wire
from proxy.doors.grpc.idempotency import Idempotency
from proxy.doors.grpc.session import Stream
from proxy.doors.grpc.wire import Outcome, failed, status_for
from proxy.pgwire import values
from proxy.pipeline.agents import AgentSessions, agent_for_token, bearer_token
from proxy.pipeline.internal import InternalClient, Reply
from proxy.pipeline.snapshot import view

if TYPE_CHECKING:
    from proxy.pipeline.runtime import Runtime

log = logging.getLogger("pgsluice.grpc")
Ctx = grpc.aio.ServicerContext[Any, Any]
M = TypeVar("M")
SERVICE = "pgsluice.v1.Sluice"
BATCH_CONCURRENCY = 32  # statements of one Batch in flight at once
_SERVED = {"executed": pb.EXECUTED, "cache": pb.CACHE_HIT, "coalesced": pb.COALESCED, "batched": pb.BATCHED}
_TOO_BIG = "54000"
_COPY_CLIENT = frozenset({Flag.COPY_FROM, Flag.COPY_TO})  # COPY ... FROM / TO
_COPY_SERVER = frozenset({Flag.COPY_FILE, Flag.COPY_PROGRAM})  # ... a server file or program: no sub-protocol
_NO_TOKEN = "pgsluice: missing or unknown bearer token"


class SluiceService:
    """pgsluice.v1.Sluice (registered by `handlers`, with the serializers each method needs)."""

    def __init__(self, server: Runtime) -> None:
        self.server = server
        self.sessions = AgentSessions(server)  # agents.py: idle internal sessions per agent (as MCP's)
        redis = server.cache.redis if server.cache is not None else None
        self.idempotency = Idempotency(server.config.idempotency_window, redis)
        self.batch_gate = asyncio.Semaphore(max(1, server.config.pool_max_size // 2))
        self.streams: set[Stream] = set()
        # a reply's rows stop being kept past this (the message limit less room for the rest)
        self.max_reply = max(1024, server.config.max_message_size - 4096)

    # ---- plumbing ----

    def _bearer(self, context: Ctx) -> AgentAuth | None:
        """The agent of the call's bearer token (agents.py, shared with the MCP door), or None."""
        for key, value in context.invocation_metadata() or ():
            if key == "authorization" and isinstance(value, str):
                token = bearer_token(value)
                return agent_for_token(self.server.config.agents, token) if token else None
        return None

    async def _agent(self, context: Ctx) -> AgentAuth:
        agent = self._bearer(context)
        if agent is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _NO_TOKEN)
        assert agent is not None
        return agent

    @staticmethod
    async def _decode(kind: Callable[[bytes], M], raw: bytes, context: Ctx) -> M:
        try:
            return kind(raw)
        except Exception as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"pgsluice: the request could not be decoded ({type(exc).__name__})")
            raise AssertionError("unreachable") from None

    def database(self, agent: AgentAuth, requested: str) -> str:
        return self.sessions.database(agent, requested)

    def take(self, agent: AgentAuth, database: str) -> InternalClient:
        return self.sessions.take(agent, database)

    def give_back(self, agent: AgentAuth, database: str, client: InternalClient) -> None:
        self.sessions.give_back(agent, database, client)

    async def _run(self, agent: AgentAuth, database: str, sql: str, params: list[str | None],
                   timeout: float = 0.0, max_rows: int = 0, wire: bool = True) -> tuple[Reply, bool]:
        """One statement on a session of the agent's (taken and given back); past `timeout` its
        statement (or its wait for an identical one) is cancelled."""
        client = self.take(agent, database)
        timed_out = False
        try:
            done = client.send(sql, params, wire=wire, max_rows=max(0, max_rows), max_bytes=self.max_reply)
            if timeout > 0 and not done.done():
                await asyncio.wait((done,), timeout=timeout)
                if not done.done():
                    timed_out = True
                    await self.server.cancel(*client.session.key)
            reply = await done
        except BaseException:
            client.close()
            raise
        self.give_back(agent, database, client)
        return reply, timed_out

    def plan(self, agent: AgentAuth, database: str, sql: str) -> Plan:
        """The planner's view of a statement (a dict look-up once seen): its fingerprint for the
        reply, its kind for a Session stream. Planned with the facts of the agent's sessions, its role
        policy included, so a verdict here is the one its statement gets when run."""
        return self.server.planner_for(database).analyze(sql, self.sessions.facts(agent, database))

    def refusal(self, plan: Plan) -> Outcome | None:
        """What this door refuses before running it: COPY from or to the client. Its copy
        sub-protocol has no place in a request and its reply (COPY FROM STDIN would wait for
        data forever, COPY TO STDOUT's rows would be lost). The role's verdict comes first."""
        if plan.flags & _COPY_CLIENT and not plan.flags & _COPY_SERVER and plan.verdict.allowed:
            return failed({"C": "0A000", "M": "pgsluice: COPY FROM STDIN and COPY TO STDOUT are not "
                                              "available over gRPC",
                           "H": "Use INSERT (a Batch, or a Session stream) to write rows, and SELECT "
                                "(or QueryStream) to read them."})
        return None

    def outcome(self, agent: AgentAuth, database: str, request: pb.QueryRequest, reply: Reply,
                timed_out: bool, started: float, fingerprint: str | None = None) -> Outcome:
        """The serialized answer to one statement from its Reply (sent with wire=True)."""
        if reply.error is not None:
            return failed(reply.error, timed_out)
        if reply.oversize:
            return self._too_big()
        if fingerprint is None:
            fingerprint = self.plan(agent, database, request.sql).fingerprint
        try:
            elapsed = (time.perf_counter() - started) * 1000
            body = grpc_wire.response(reply.wire, reply.tag, reply.served, elapsed, fingerprint,
                                      reply.truncated, request.format != pb.WIRE)
        except UnicodeDecodeError:
            return failed({"C": "22021", "M": "pgsluice: a text value of the reply is not valid UTF-8"})
        if len(body) > self.max_reply:
            return self._too_big()
        return Outcome(True, body)

    def _too_big(self) -> Outcome:
        return failed({"C": _TOO_BIG, "M": f"pgsluice: the reply is larger than max_message_size "
                                          f"({self.server.config.max_message_size} bytes)",
                       "H": "Use QueryStream, or the max_rows hint."})

    async def execute(self, agent: AgentAuth, database: str, request: pb.QueryRequest,
                      client: InternalClient | None = None) -> Outcome:
        """Run one statement (on `client`, or on one of the agent's sessions)."""
        plan = self.plan(agent, database, request.sql)
        refused = self.refusal(plan)
        if refused is not None:
            return refused
        sql = _hinted(request)
        hints = request.hints
        params = [values.encode(v) for v in request.params]
        started = time.perf_counter()
        if client is not None:
            reply = await client.send(sql, params, wire=True, max_rows=max(0, hints.max_rows),
                                      max_bytes=self.max_reply)
            timed_out = False
        elif hints.priority == pb.BATCH:
            async with self.batch_gate:
                reply, timed_out = await self._run(agent, database, sql, params, hints.timeout_seconds,
                                                   hints.max_rows)
        else:
            reply, timed_out = await self._run(agent, database, sql, params, hints.timeout_seconds,
                                               hints.max_rows)
        return self.outcome(agent, database, request, reply, timed_out, started, plan.fingerprint)

    async def answer(self, agent: AgentAuth, database: str, request: pb.QueryRequest) -> Outcome:
        """execute(), through the agent's idempotency keys when the request has one."""
        if not request.idempotency_key:
            return await self.execute(agent, database, request)
        failure: list[Outcome] = []

        async def work() -> bytes | None:
            outcome = await self.execute(agent, database, request)
            if not outcome.ok:
                failure.append(outcome)
                return None
            return outcome.body

        stored = await self.idempotency.run(f"{agent.name}:{request.idempotency_key}", work)
        return Outcome(True, stored) if stored is not None else failure[0]

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

    async def Query(self, raw: bytes, context: Ctx) -> bytes:
        try:
            request = pb.QueryRequest.FromString(raw)
        except Exception:
            request = await self._decode(pb.QueryRequest.FromString, raw, context)  # aborts
        agent = self._bearer(context) or await self._agent(context)
        database = self.database(agent, request.database)
        hints = request.hints
        if request.idempotency_key or hints.priority == pb.BATCH or hints.timeout_seconds > 0:
            outcome = await self.answer(agent, database, request)
        elif (refused := self.refusal(plan := self.plan(agent, database, request.sql))) is not None:
            outcome = refused
        else:  # the common call, inline: a cache hit is answered without a coroutine more
            started = time.perf_counter()
            client = self.take(agent, database)
            done = client.send(_hinted(request), [values.encode(v) for v in request.params],
                               wire=True, max_rows=max(0, hints.max_rows), max_bytes=self.max_reply)
            if not done.done():
                try:
                    await done
                except BaseException:
                    client.close()
                    raise
            reply = done.result()
            self.give_back(agent, database, client)
            outcome = self.outcome(agent, database, request, reply, False, started, plan.fingerprint)
        if not outcome.ok:
            assert outcome.error is not None
            await self._fail(context, outcome.error, outcome.timed_out)
        return outcome.body

    async def Session(self, requests: AsyncIterator[bytes], context: Ctx) -> None:
        agent = self._bearer(context)
        if agent is None:
            # after the client's first request (not run) or half-close, 10 s at most: a client
            # whose write meets a stream already over sees grpc's own INTERNAL, not this status
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(context.read(), 10)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, _NO_TOKEN)
        assert agent is not None
        await Stream(self, agent, context).run()

    async def QueryStream(self, raw: bytes, context: Ctx) -> AsyncIterator[pb.QueryChunk]:
        request = await self._decode(pb.QueryRequest.FromString, raw, context)
        agent = await self._agent(context)
        database = self.database(agent, request.database)
        refused = self.refusal(self.plan(agent, database, request.sql))
        if refused is not None:
            assert refused.error is not None
            await self._fail(context, refused.error, False)
        sql = _hinted(request)
        client = self.take(agent, database)
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
                self.give_back(agent, database, client)
            else:
                client.close()

    async def Batch(self, raw: bytes, context: Ctx) -> bytes:
        request = await self._decode(pb.BatchRequest.FromString, raw, context)
        agent = await self._agent(context)
        default = self.database(agent, request.database)
        if request.transaction:
            return await self._transaction(agent, request, default)
        gate = asyncio.Semaphore(BATCH_CONCURRENCY)

        async def one(statement: pb.QueryRequest) -> tuple[bool, bytes]:
            async with gate:
                outcome = await self.execute(agent, statement.database or default, statement)
            return outcome.ok, outcome.body

        items = await asyncio.gather(*(one(st) for st in request.statements))
        return grpc_wire.batch_response(items, False)

    async def _transaction(self, agent: AgentAuth, request: pb.BatchRequest, database: str) -> bytes:
        if any(st.database and st.database != database for st in request.statements):
            refused = failed({"C": "0A000", "M": "a transaction batch runs in one database"}).body
            return grpc_wire.batch_response([(False, refused)] * len(request.statements), False)
        client = self.take(agent, database)
        items: list[tuple[bool, bytes]] = []
        try:
            begin = await client.query("BEGIN")
            failing = begin.error is not None
            for statement in request.statements:
                if failing:
                    items.append((False, grpc_wire.error(
                        {"C": "25P02", "M": "not run: an earlier statement of the transaction failed"},
                        grpc.StatusCode.ABORTED.value[0])))
                    continue
                outcome = await self.execute(agent, database, statement, client)
                items.append((outcome.ok, outcome.body))
                failing = not outcome.ok
            end = await client.query("ROLLBACK" if failing else "COMMIT")
            committed = not failing and end.error is None and end.tag == "COMMIT"
        except BaseException:
            client.close()
            raise
        self.give_back(agent, database, client)
        return grpc_wire.batch_response(items, committed)

    async def Explain(self, request: pb.ExplainRequest, context: Ctx) -> pb.ExplainResponse:
        agent = await self._agent(context)
        database = self.database(agent, request.database)
        plan = self.plan(agent, database, request.sql)  # with the agent's role policy, as it runs
        v = plan.verdict
        out = pb.ExplainResponse(
            fingerprint=plan.fingerprint, canonical_sql=plan.canonical, kind=plan.kind.value,
            cacheable=plan.cacheable, why_not=plan.why_not, tables_read=sorted(plan.tables_read),
            tables_written=sorted(plan.tables_written), text=describe(plan),
            verdict="allow" if v.allowed else f"reject {v.sqlstate} [{v.rule}] {v.message}")
        if request.postgres_explain:
            reply, _ = await self._run(agent, database, "EXPLAIN (FORMAT JSON) " + request.sql, [],
                                       wire=False)
            if reply.error is not None:
                await self._fail(context, reply.error, False)
            out.postgres_plan_json = (reply.rows[0][0] or b"").decode() if reply.rows else ""
        return out

    async def Invalidate(self, request: pb.InvalidateRequest,
                         context: Ctx) -> pb.InvalidateResponse:
        agent = await self._agent(context)
        database = self.database(agent, request.database)
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


def _decoding(kind: Callable[[bytes], Any],
              behavior: Callable[[Any, Ctx], Awaitable[Any]]) -> Callable[[bytes, Ctx], Awaitable[Any]]:
    """A unary method that takes its request as bytes and decodes it (INVALID_ARGUMENT if not)."""
    async def unary(raw: bytes, context: Ctx) -> Any:
        return await behavior(await SluiceService._decode(kind, raw, context), context)
    return unary


def handlers(service: SluiceService) -> grpc.GenericRpcHandler:  # type: ignore[type-arg]
    """The service's methods with their serializers: requests arrive as bytes (each method
    decodes its own); Query, Batch and Session reply with bytes they serialized themselves."""
    raw = {"request_deserializer": None, "response_serializer": None}
    methods = {
        "Query": grpc.unary_unary_rpc_method_handler(service.Query, **raw),
        "Batch": grpc.unary_unary_rpc_method_handler(service.Batch, **raw),
        "Session": grpc.stream_stream_rpc_method_handler(service.Session, **raw),
        "QueryStream": grpc.unary_stream_rpc_method_handler(
            service.QueryStream, request_deserializer=None,
            response_serializer=pb.QueryChunk.SerializeToString),
    }
    for name, kind, answer in (("Explain", pb.ExplainRequest, pb.ExplainResponse),
                               ("Invalidate", pb.InvalidateRequest, pb.InvalidateResponse),
                               ("Stats", pb.StatsRequest, pb.StatsResponse)):
        methods[name] = grpc.unary_unary_rpc_method_handler(
            _decoding(kind.FromString, getattr(service, name)), request_deserializer=None,
            response_serializer=answer.SerializeToString)
    return grpc.method_handlers_generic_handler(SERVICE, methods)


class GrpcDoor:
    def __init__(self, server: Runtime) -> None:
        self.server = server
        self.grpc = grpc.aio.server(options=[
            ("grpc.max_receive_message_length", server.config.max_message_size),
            ("grpc.max_send_message_length", server.config.max_message_size),
            ("grpc.keepalive_time_ms", 30_000), ("grpc.keepalive_timeout_ms", 10_000)])
        self.service = SluiceService(server)
        self.grpc.add_generic_rpc_handlers((handlers(self.service),))
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
        """Session streams stop reading and end once what they read is answered; unary calls
        in flight get `grace` seconds, as grpc's own stop gives them."""
        if self._checker is not None:
            self._checker.cancel()
        for stream in list(self.service.streams):
            stream.shutdown()
        await self.grpc.stop(grace)
        self.service.sessions.close()
