"""`--workers N`: N processes on the same ports (SO_REUSEPORT), one event loop each.

The parent forks the workers before any event loop exists, forwards SIGTERM/SIGINT/SIGHUP
to them, restarts a worker that dies unexpectedly, and exits when they have all stopped.
Consistency across workers (DESIGN.md): with Redis, versions are there; without it, the
workers share table versions in a shared memory mapping made before the fork
(cache.versions.SharedCounters), so a write through one worker is never followed by a
stale read through another. The workers publish their counters to a directory this parent
makes (snapshot.py): the admin console and /metrics of any worker report the sum. Admin
actions (RELOAD, PAUSE, RESUME, SHUTDOWN) come back here as signals and go to every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable, Coroutine
from types import FrameType
from typing import Any

from cache.versions import SharedCounters, SharedLsns
from proxy.backends.backend_keys import make_file as make_keys_file
from proxy.base.admission import make_counts_file
from proxy.base.config import Config

log = logging.getLogger("pgsluice.workers")
# SIGUSR1 / SIGUSR2: PAUSE / RESUME from the admin console of any worker
_FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)
Serve = Callable[..., Coroutine[Any, Any, None]]


def run_workers(config: Config, reload_from: Callable[[], Config], serve: Serve) -> int:
    # (with Redis, versions are there; the workers still share who their server connections are)
    shared = SharedCounters(workers=config.workers) if config.cache or config.replicas else None
    if shared is not None and config.replicas:
        shared.lsns = SharedLsns(workers=config.workers)
    stats_dir = tempfile.mkdtemp(prefix="pgsluice-workers-")
    make_counts_file(stats_dir, config.workers)  # max_client_conn counts over all workers
    make_keys_file(stats_dir)  # whose server connection sent a notification
    try:
        return _run(config, reload_from, serve, shared, stats_dir)
    finally:
        shutil.rmtree(stats_dir, ignore_errors=True)


def _run(config: Config, reload_from: Callable[[], Config], serve: Serve, shared: SharedCounters | None,
         stats_dir: str) -> int:
    children: dict[int, int] = {}  # pid -> worker index
    stopping = False

    def start(index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 0
            try:
                for sig in _FORWARDED:
                    signal.signal(sig, signal.SIG_DFL)
                asyncio.run(serve(config, reload_from, shared, index, stats_dir))
            except BaseException:
                log.exception("worker %d failed", index)
                code = 1
            finally:
                logging.shutdown()
                os._exit(code)
        children[pid] = index
        log.info("worker %d started (pid %d)", index, pid)

    def forward(sig: int, _frame: FrameType | None) -> None:
        nonlocal stopping
        if sig in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for pid in list(children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM if sig == signal.SIGINT else sig)

    for sig in _FORWARDED:
        signal.signal(sig, forward)
    for index in range(config.workers):
        start(index)
    failures = 0
    while children:
        try:
            pid, status = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        index = children.pop(pid, -1)
        code = os.waitstatus_to_exitcode(status)
        if shared is not None and index >= 0:
            # its connections are gone; a write of it may have committed without its bump
            shared.clear_pids(index)
            shared.new_epoch()
            if shared.lsns is not None:
                shared.lsns.open_gap()
                shared.lsns.clear_worker(index)
        if stopping or index < 0:
            continue
        failures += 1
        log.error("worker %d (pid %d) exited with %d: restarting", index, pid, code)
        time.sleep(min(5.0, 0.2 * failures))
        start(index)
    return 0
