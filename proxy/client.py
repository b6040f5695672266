"""A small typed client for pgsluice's gRPC door.

    from proxy.client import SluiceClient

    async with SluiceClient("127.0.0.1:50051", token="...") as db:
        rows = await db.query("SELECT id, name FROM customers WHERE id = $1", 42)
        rows[0]["name"]; db.last.served  # "CACHE_HIT", "COALESCED" or "EXECUTED"

Parameters are bound (never interpolated): None, bool, int, float, str, bytes, lists
(arrays), and anything else as its text form. Values come back as Python values for
null/bool/integers/floats/text/bytea/arrays, as strings (Postgres's text form) for numeric,
dates, times, intervals, uuid and json. Postgres errors raise SluiceError with the SQLSTATE.
"""

from __future__ import annotations

from types import TracebackType
from typing import Any

import grpc

from protos.pgsluice.v1 import sluice_pb2 as pb
from protos.pgsluice.v1 import sluice_pb2_grpc


class SluiceError(Exception):
    def __init__(self, code: grpc.StatusCode, sqlstate: str, message: str) -> None:
        super().__init__(f"{sqlstate}: {message}" if sqlstate else message)
        self.code, self.sqlstate, self.message = code, sqlstate, message


def to_value(x: Any) -> pb.Value:
    if x is None:
        return pb.Value(null=True)
    if isinstance(x, bool):
        return pb.Value(bool=x)
    if isinstance(x, int):
        return pb.Value(int64=x)
    if isinstance(x, float):
        return pb.Value(double=x)
    if isinstance(x, bytes):
        return pb.Value(bytea=x)
    if isinstance(x, list | tuple):
        return pb.Value(array=pb.Array(values=[to_value(v) for v in x]))
    return pb.Value(text=str(x))


def from_value(v: pb.Value) -> Any:
    kind = v.WhichOneof("kind")
    if kind is None or kind == "null":
        return None
    if kind == "array":
        return [from_value(x) for x in v.array.values]
    if kind == "other":
        return v.other.text
    return getattr(v, kind)


def _read(pem: str | bytes | None) -> bytes | None:
    """PEM bytes as given, or read from a file path."""
    if pem is None or isinstance(pem, bytes):
        return pem
    with open(pem, "rb") as f:
        return f.read()


class SluiceClient:
    """`tls=True` (or a `ca`) talks TLS: `ca` is the CA bundle that signed pgsluice's certificate
    (None: the system's roots); `cert`/`key` are a client certificate, when pgsluice has tls_ca.
    Each is PEM bytes or a file path."""

    def __init__(self, target: str, token: str, database: str = "", *, tls: bool = False,
                 ca: str | bytes | None = None, cert: str | bytes | None = None,
                 key: str | bytes | None = None) -> None:
        if tls or ca is not None or cert is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=_read(ca), private_key=_read(key),
                                                       certificate_chain=_read(cert))
            self.channel = grpc.aio.secure_channel(target, credentials)
        else:
            self.channel = grpc.aio.insecure_channel(target)
        self.stub = sluice_pb2_grpc.SluiceStub(self.channel)  # type: ignore[no-untyped-call]
        self.metadata = (("authorization", f"Bearer {token}"),)
        self.database = database
        self.last: pb.QueryResponse | None = None

    async def query(self, sql: str, *params: Any, max_staleness: float | None = None,
                    timeout: float = 0.0) -> list[dict[str, Any]]:
        hints = pb.Hints(timeout_seconds=timeout)
        if max_staleness is not None:
            hints.max_staleness_seconds = max_staleness
        request = pb.QueryRequest(sql=sql, params=[to_value(p) for p in params], database=self.database,
                                  hints=hints)
        try:
            reply: pb.QueryResponse = await self.stub.Query(request, metadata=self.metadata)
        except grpc.aio.AioRpcError as err:
            trailers: Any = err.trailing_metadata() or ()
            sqlstate = next((str(item[1]) for item in trailers if item[0] == "pgsluice-sqlstate"), "")
            raise SluiceError(err.code(), sqlstate, err.details() or "") from None
        self.last = reply
        names = [c.name for c in reply.columns]
        return [dict(zip(names, (from_value(v) for v in row.values), strict=True)) for row in reply.rows]

    async def close(self) -> None:
        await self.channel.close(None)

    async def __aenter__(self) -> SluiceClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()
