"""A gRPC call's edges, the same for every method of the door: who is calling (the agent of
its `authorization: Bearer <token>`, UNAUTHENTICATED without one), its request decoded from the
bytes it arrived as (INVALID_ARGUMENT if they do not decode), and a Postgres error turned into
the call's status, with the SQLSTATE and the error's fields in the trailing metadata.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import grpc
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2

from proxy.base.config import AgentAuth
from proxy.doors.grpc.wire import status_for
from proxy.pipeline.agents import agent_for_token, bearer_token

Ctx = grpc.aio.ServicerContext[Any, Any]
M = TypeVar("M")
NO_TOKEN = "pgsluice: missing or unknown bearer token"


def bearer(agents: tuple[AgentAuth, ...], context: Ctx) -> AgentAuth | None:
    """The agent of the call's bearer token (agents.py, shared with the MCP door), or None."""
    for key, value in context.invocation_metadata() or ():
        if key == "authorization" and isinstance(value, str):
            token = bearer_token(value)
            return agent_for_token(agents, token) if token else None
    return None


async def agent_of(agents: tuple[AgentAuth, ...], context: Ctx) -> AgentAuth:
    """The call's agent; the call is aborted UNAUTHENTICATED without one."""
    agent = bearer(agents, context)
    if agent is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, NO_TOKEN)
    assert agent is not None
    return agent


async def decode(kind: Callable[[bytes], M], raw: bytes, context: Ctx) -> M:
    try:
        return kind(raw)
    except Exception as exc:
        await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                            f"pgsluice: the request could not be decoded ({type(exc).__name__})")
        raise AssertionError("unreachable") from None


async def fail(context: Ctx, error: dict[str, str], timed_out: bool) -> None:
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
