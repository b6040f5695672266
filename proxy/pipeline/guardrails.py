"""A role policy on the way to the backend: a statement's plan under it, and what stands in for
a statement it refuses (Rejected), for simple Queries (relay.py) and Parse (prepared.py)
alike; replies.py puts the Rejected's clean error in place of Postgres's.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from planner import Kind, Plan, Verdict
from proxy.base.logs import fields
from proxy.pgwire import encode

if TYPE_CHECKING:
    from proxy.pipeline.session import Session

log = logging.getLogger("pgsluice.queries")


class Rejected:
    """A statement a guardrail refused: Postgres runs a DO block raising the same SQLSTATE
    (so transaction state follows exactly), and the client gets this clean ErrorResponse."""

    __slots__ = ("code", "error", "sql")

    def __init__(self, verdict: Verdict) -> None:
        self.code = b"\x00C" + verdict.sqlstate.encode() + b"\x00"
        self.error = encode.error_response(verdict.sqlstate, verdict.message, hint=verdict.hint or None)
        code, message = encode.quote_literal(verdict.sqlstate), encode.quote_literal(verdict.message)
        self.sql = (f"DO $pgsluice$BEGIN RAISE EXCEPTION USING ERRCODE = {code}, MESSAGE = {message};"
                    " END$pgsluice$").encode()


def plan(s: Session, sql: bytes) -> Plan:
    assert s.planner is not None
    plan = s.planner.analyze(sql.decode("utf-8", "replace"), s.facts)
    if plan.kind is Kind.DDL:
        s.server.ddl_seen(s.database)
    return plan


def rejected(s: Session, verdict: Verdict) -> Rejected:
    s.agent_stats.rejected += 1
    s.server.stats.rejected += 1
    log.info("query rejected", extra=fields(client=s.token, agent=s.agent, rule=verdict.rule,
                                            sqlstate=verdict.sqlstate, sql=s.last_statement))
    return Rejected(verdict)
