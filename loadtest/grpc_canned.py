"""The reference for the gRPC door's benchmark: a grpc.aio server that answers every call with a
canned reply and does nothing else, so its capacity is what Python's grpcio itself allows.

    python -m loadtest.grpc_canned --port 50099

`Query` returns one canned QueryResponse (a point read's: three columns, one row, served from
cache); `Session` answers each request with the same reply and the request's id, one at a time.
Both through the generated servicer (protobuf messages, grpcio's serializers), on uvloop as
pgsluice runs. Any token is accepted.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc

from protos.pgsluice.v1 import sluice_pb2 as pb
from protos.pgsluice.v1 import sluice_pb2_grpc

CANNED = pb.QueryResponse(
    columns=[pb.Column(name="id", type_oid=23, type_name="int4"),
             pb.Column(name="name", type_oid=25, type_name="text"),
             pb.Column(name="country", type_oid=25, type_name="text")],
    rows=[pb.Row(values=[pb.Value(int64=42), pb.Value(text="customer 42"), pb.Value(text="DE")])],
    command_tag="SELECT 1", served=pb.CACHE_HIT, elapsed_ms=0.01, fingerprint="0123456789abcdef")


class Canned(sluice_pb2_grpc.SluiceServicer):
    async def Query(self, request: pb.QueryRequest, context: Any) -> pb.QueryResponse:
        return CANNED

    async def Session(self, request_iterator: AsyncIterator[pb.SessionRequest],
                      context: Any) -> AsyncIterator[pb.SessionReply]:
        async for request in request_iterator:
            yield pb.SessionReply(id=request.id, result=CANNED)


async def serve(port: int) -> None:
    server = grpc.aio.server()
    sluice_pb2_grpc.add_SluiceServicer_to_server(Canned(), server)  # type: ignore[no-untyped-call]
    if not server.add_insecure_port(f"127.0.0.1:{port}"):
        raise OSError(f"cannot listen on 127.0.0.1:{port}")
    await server.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"canned gRPC server on 127.0.0.1:{port}", flush=True)
    await stop.wait()
    await server.stop(0.5)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loadtest.grpc_canned", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--port", type=int, required=True)
    args = p.parse_args(argv)
    try:
        import uvloop
        uvloop.run(serve(args.port))
    except ImportError:  # pragma: no cover - a dependency wherever it builds
        asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    sys.exit(main())
