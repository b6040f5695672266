"""How the gRPC door runs one statement for an agent, for the unary methods and the Session
stream alike: on one of the agent's internal sessions (taken and given back), planned with the
facts of those sessions (the role's policy included), refused before it runs when this door
cannot carry it (COPY to or from the client), through the agent's idempotency keys and the
batch gate when asked, and answered as the serialized reply (an Outcome, built by wire.py).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from planner import Flag, Plan
from protos.pgsluice.v1 import sluice_pb2 as pb
from proxy.base.config import AgentAuth
from proxy.doors.grpc import wire as grpc_wire
from proxy.doors.grpc.idempotency import Idempotency
from proxy.doors.grpc.wire import Outcome, failed
from proxy.pgwire import values
from proxy.pipeline.agents import AgentSessions
from proxy.pipeline.internal import InternalClient, Reply

if TYPE_CHECKING:
    from proxy.pipeline.runtime import Runtime

_TOO_BIG = "54000"
_COPY_CLIENT = frozenset({Flag.COPY_FROM, Flag.COPY_TO})  # COPY ... FROM / TO
_COPY_SERVER = frozenset({Flag.COPY_FILE, Flag.COPY_PROGRAM})  # ... a server file or program: no sub-protocol


class Statements:
    """One agent's statements through the pipeline (the service's RPCs and the Session stream
    both run theirs here)."""

    def __init__(self, server: Runtime) -> None:
        self.server = server
        self.sessions = AgentSessions(server)  # agents.py: idle internal sessions per agent (as MCP's)
        redis = server.cache.redis if server.cache is not None else None
        self.idempotency = Idempotency(server.config.idempotency_window, redis)
        self.batch_gate = asyncio.Semaphore(max(1, server.config.pool_max_size // 2))
        # a reply's rows stop being kept past this (the message limit less room for the rest)
        self.max_reply = max(1024, server.config.max_message_size - 4096)

    def database(self, agent: AgentAuth, requested: str) -> str:
        return self.sessions.database(agent, requested)

    def take(self, agent: AgentAuth, database: str) -> InternalClient:
        return self.sessions.take(agent, database)

    def give_back(self, agent: AgentAuth, database: str, client: InternalClient) -> None:
        self.sessions.give_back(agent, database, client)

    async def run(self, agent: AgentAuth, database: str, sql: str, params: list[str | None],
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
        sql = hinted(request)
        hints = request.hints
        params = [values.encode(v) for v in request.params]
        started = time.perf_counter()
        if client is not None:
            reply = await client.send(sql, params, wire=True, max_rows=max(0, hints.max_rows),
                                      max_bytes=self.max_reply)
            timed_out = False
        elif hints.priority == pb.BATCH:
            async with self.batch_gate:
                reply, timed_out = await self.run(agent, database, sql, params, hints.timeout_seconds,
                                                  hints.max_rows)
        else:
            reply, timed_out = await self.run(agent, database, sql, params, hints.timeout_seconds,
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


def hinted(request: pb.QueryRequest) -> str:
    """The statement with its freshness hint as the comment the planner reads."""
    if request.hints.HasField("max_staleness_seconds"):
        return f"/* pgsluice: max_staleness={request.hints.max_staleness_seconds}s */ {request.sql}"
    return request.sql
