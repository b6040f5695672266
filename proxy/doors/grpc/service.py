"""pgsluice.v1.Sluice's methods, and `handlers`, which registers them with the serializers each
needs. Requests arrive as bytes and each method decodes its own, so one that does not decode is
INVALID_ARGUMENT (a Session request: an error reply, the stream goes on); Query, Batch and
Session reply with bytes they serialized themselves (wire.py), the others with protobuf objects.
How a statement runs is statements.py's; the Session stream is session.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from cache.deps import write_names
from planner.explain import describe
from planner.tables import Effect
from protos.pgsluice.v1 import sluice_pb2 as pb
from proxy.base.config import AgentAuth
from proxy.base.stats import quantile
from proxy.doors.grpc import wire as grpc_wire
from proxy.doors.grpc.calls import NO_TOKEN, Ctx, agent_of, bearer, decode, fail
from proxy.doors.grpc.session import Stream
from proxy.doors.grpc.statements import Statements, hinted
from proxy.doors.grpc.wire import failed
from proxy.pgwire import values
from proxy.pipeline.snapshot import view

if TYPE_CHECKING:
    from proxy.pipeline.runtime import Runtime

SERVICE = "pgsluice.v1.Sluice"
BATCH_CONCURRENCY = 32  # statements of one Batch in flight at once
_SERVED = {"executed": pb.EXECUTED, "cache": pb.CACHE_HIT, "coalesced": pb.COALESCED, "batched": pb.BATCHED}


class SluiceService(Statements):
    """pgsluice.v1.Sluice (registered by `handlers`, with the serializers each method needs)."""

    def __init__(self, server: Runtime) -> None:
        super().__init__(server)
        self.streams: set[Stream] = set()

    async def Query(self, raw: bytes, context: Ctx) -> bytes:
        try:
            request = pb.QueryRequest.FromString(raw)
        except Exception:
            request = await decode(pb.QueryRequest.FromString, raw, context)  # aborts
        agents = self.server.config.agents
        agent = bearer(agents, context) or await agent_of(agents, context)
        database = self.database(agent, request.database)
        hints = request.hints
        if request.idempotency_key or hints.priority == pb.BATCH or hints.timeout_seconds > 0:
            outcome = await self.answer(agent, database, request)
        elif (refused := self.refusal(plan := self.plan(agent, database, request.sql))) is not None:
            outcome = refused
        else:  # the common call, inline: a cache hit is answered without a coroutine more
            started = time.perf_counter()
            client = self.take(agent, database)
            done = client.send(hinted(request), [values.encode(v) for v in request.params],
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
            await fail(context, outcome.error, outcome.timed_out)
        return outcome.body

    async def Session(self, requests: AsyncIterator[bytes], context: Ctx) -> None:
        agent = bearer(self.server.config.agents, context)
        if agent is None:
            # after the client's first request (not run) or half-close, 10 s at most: a client
            # whose write meets a stream already over sees grpc's own INTERNAL, not this status
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(context.read(), 10)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, NO_TOKEN)
        assert agent is not None
        await Stream(self, self.streams, agent, context).run()

    async def QueryStream(self, raw: bytes, context: Ctx) -> AsyncIterator[pb.QueryChunk]:
        request = await decode(pb.QueryRequest.FromString, raw, context)
        agent = await agent_of(self.server.config.agents, context)
        database = self.database(agent, request.database)
        refused = self.refusal(self.plan(agent, database, request.sql))
        if refused is not None:
            assert refused.error is not None
            await fail(context, refused.error, False)
        sql = hinted(request)
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
                        await fail(context, payload.error, False)
                    served = _SERVED.get(payload.served, pb.EXECUTED)
                    yield pb.QueryChunk(command_tag=payload.tag, served=served)
        finally:
            if ended:
                self.give_back(agent, database, client)
            else:
                client.close()

    async def Batch(self, raw: bytes, context: Ctx) -> bytes:
        request = await decode(pb.BatchRequest.FromString, raw, context)
        agent = await agent_of(self.server.config.agents, context)
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
        agent = await agent_of(self.server.config.agents, context)
        database = self.database(agent, request.database)
        plan = self.plan(agent, database, request.sql)  # with the agent's role policy, as it runs
        v = plan.verdict
        out = pb.ExplainResponse(
            fingerprint=plan.fingerprint, canonical_sql=plan.canonical, kind=plan.kind.value,
            cacheable=plan.cacheable, why_not=plan.why_not, tables_read=sorted(plan.tables_read),
            tables_written=sorted(plan.tables_written), text=describe(plan),
            verdict="allow" if v.allowed else f"reject {v.sqlstate} [{v.rule}] {v.message}")
        if request.postgres_explain:
            reply, _ = await self.run(agent, database, "EXPLAIN (FORMAT JSON) " + request.sql, [],
                                      wire=False)
            if reply.error is not None:
                await fail(context, reply.error, False)
            out.postgres_plan_json = (reply.rows[0][0] or b"").decode() if reply.rows else ""
        return out

    async def Invalidate(self, request: pb.InvalidateRequest,
                         context: Ctx) -> pb.InvalidateResponse:
        agent = await agent_of(self.server.config.agents, context)
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
        await agent_of(self.server.config.agents, context)
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


def _row(row: list[bytes | None], types: list[int]) -> pb.Row:
    return pb.Row(values=[values.decode(v, t) for v, t in zip(row, types, strict=True)])


def _decoding(kind: Callable[[bytes], Any],
              behavior: Callable[[Any, Ctx], Awaitable[Any]]) -> Callable[[bytes, Ctx], Awaitable[Any]]:
    """A unary method that takes its request as bytes and decodes it (INVALID_ARGUMENT if not)."""
    async def unary(raw: bytes, context: Ctx) -> Any:
        return await behavior(await decode(kind, raw, context), context)
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
