"""Runs `python -m proxy ...` (from the current directory's checkout) in this process, with a
probe on 127.0.0.1:$GC_PROBE_PORT: each connection to it makes CPython run a full collection
and answers one JSON line with how long it took and how many objects the collector tracks.
The probe's thread holds the interpreter meanwhile, so the proxy's event loop waits for it
exactly as it waits for any full collection. Used by loadtest/gc_bench.py.

    GC_PROBE_PORT=7777 python /path/to/loadtest/gc_probe.py serve --upstream ...
"""

from __future__ import annotations

import gc
import json
import os
import runpy
import socket
import sys
import threading
import time


def probe(port: int) -> None:
    server = socket.create_server(("127.0.0.1", port))
    while True:
        conn, _ = server.accept()
        with conn:
            started = time.perf_counter()
            gc.collect()
            ms = (time.perf_counter() - started) * 1000
            conn.sendall(json.dumps({"full_ms": ms, "tracked": len(gc.get_objects())}).encode() + b"\n")


if __name__ == "__main__":
    sys.path.insert(0, os.getcwd())  # the checkout under test, not this file's
    threading.Thread(target=probe, args=(int(os.environ["GC_PROBE_PORT"]),), daemon=True).start()
    sys.argv = ["proxy", *sys.argv[1:]]
    runpy.run_module("proxy", run_name="__main__", alter_sys=True)
