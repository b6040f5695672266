"""The pipeline's shared state in one process: config, pools, planners, cache, replicas,
burst batching, cancel keys, the sessions, and the operations on them (pause, reload,
cancel, databases going away).

Every door's sessions reach the rest of pgsluice through it (`session.server`); it knows no
door. ops/server.py's Server is a Runtime that also serves the doors and shuts them down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import secrets
import signal
import struct
import time
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

from cache.deps import change_effects, write_names
from cache.engine import Cache, CacheSettings
from cache.feed import Change, ChangeFeed
from cache.versions import SharedCounters
from planner import Catalog, Planner, SessionFacts
from planner.catalog import load as load_catalog
from planner.tables import TableFacts
from proxy.backends.authquery import AuthQuery
from proxy.backends.backend import Credentials, Upstream, send_cancel
from proxy.backends.backend_keys import BackendKeys
from proxy.backends.pool import Pool, PoolSettings
from proxy.backends.replicas import Replicas
from proxy.base.admission import Admission
from proxy.base.channel import CANCEL, CLOSE_DATABASE, WorkerChannel
from proxy.base.config import Config, parse_upstream
from proxy.base.stats import ServerStats
from proxy.base.tls import asyncpg_ssl, door_tls, upstream_tls
from proxy.base.userlist import Credential, load_userlist
from proxy.pgwire.errors import ADMIN_SHUTDOWN
from proxy.pgwire.scram import ScramSecret, make_scram_secret
from proxy.pipeline.batching import Batcher
from proxy.pipeline.session import Session
from proxy.pipeline.snapshot import publish

log = logging.getLogger("pgsluice.server")
_I = struct.Struct("!I")
_PID_COUNTER = (1 << 23) - 1  # cancel key process ids: counter << 8 | worker index, below 2**31


class Runtime:
    def __init__(self, config: Config, shared: SharedCounters | None = None, worker: int = 0,
                 stats_dir: str | None = None) -> None:
        self.config = config
        self.worker = worker  # index among config.workers processes
        self.stats_dir = stats_dir  # where the workers publish their counters (snapshot.py)
        url = parse_upstream(config.upstream)
        self.upstream = Upstream(url.host, url.port,
                                 None if url.host.startswith("/") else upstream_tls(config))
        self.upstream_user = url.user
        self.upstream_password = url.password
        self.tls = door_tls(config)  # None: SSLRequest is answered 'N'
        self.auth_query = self._auth_query(config) if config.auth_mode == "passthrough" else None
        self.pools: dict[tuple[str, str], Pool] = {}
        self.clients: set[Session] = set()
        self.admission = Admission(worker, config.workers, stats_dir)  # max_client_conn
        self.cancel_keys: dict[tuple[int, bytes], Session] = {}
        self.backend_keys = BackendKeys(stats_dir if config.workers > 1 else None)  # backend_keys.py
        self.userlist: dict[str, Credential] = (
            load_userlist(config.auth_file) if config.auth_mode == "auth_file" else {})
        self._scram_secrets: dict[tuple[str, str], ScramSecret] = {}
        self.stats = ServerStats()
        self.shutting_down = False
        self._tasks: set[asyncio.Task[Any]] = set()
        self._janitor: asyncio.Task[None] | None = None
        self._next_pid = secrets.randbelow(_PID_COUNTER)
        self.channel: WorkerChannel | None = None  # to the other workers (channel.py)
        self.planners: dict[str, Planner] = {}
        self.started = time.monotonic()
        self.paused = False
        self.parked: set[Session] = set()
        self.stop_requested = asyncio.Event()
        self.reload_config: Callable[[], Config] | None = None  # set by `pgsluice serve`
        self._publisher: asyncio.Task[None] | None = None
        self._catalog_refresh: set[str] = set()
        self._catalog_gen: dict[str, int] = {}
        c = config
        self.cache: Cache | None = Cache(CacheSettings(
            enabled=True, max_bytes=c.cache_max_bytes, max_entry=c.cache_max_entry, ttl=c.cache_ttl,
            redis=c.redis, redis_timeout=c.redis_timeout_ms / 1000.0,
            requires_feed=c.cache_requires_feed), shared) if c.cache else None
        self.shared = shared
        if self.cache is not None:
            self.cache.own_pid = self.own_pid
        self.replicas: Replicas | None = None
        if config.replicas:
            if config.redis:
                log.warning("replicas are NOT used: with redis, several pgsluice instances may share "
                            "the cache, and the write positions that make replica reads safe are "
                            "shared only between the workers of one instance")
            elif config.workers > 1 and (shared is None or shared.lsns is None):
                log.warning("replicas are NOT used: %d workers without shared write positions",
                            config.workers)
            else:
                lsns = shared.lsns if shared is not None and config.workers > 1 else None
                self.replicas = Replicas(self, lsns)
        # burst batching (batching.py): needs the cache's single-flight and misses
        self.batcher: Batcher | None = Batcher(self, c.batch_max) if c.batching and self.cache else None

    @property
    def tracks_writes(self) -> bool:
        """Whether sessions work out what each statement writes (for the cache's versions, or
        for the replicas' write positions)."""
        return self.cache is not None or self.replicas is not None

    # ---- pools and credentials -----------------------------------------------------------------

    def pool_settings(self) -> PoolSettings:
        c = self.config
        return PoolSettings(min_size=c.pool_min_size, max_size=c.pool_max_size,
                            acquire_timeout=c.pool_acquire_timeout, connect_timeout=c.connect_timeout,
                            idle_timeout=c.server_idle_timeout, lifetime=c.server_lifetime,
                            check_delay=c.server_check_delay)

    def pool(self, database: str, user: str) -> Pool:
        pool = self.pools.get((database, user))
        if pool is None:
            pool = Pool(self.upstream, database, user, self.default_creds(user), self.pool_settings())
            pool.pids.changed = self.publish_pids
            self.pools[(database, user)] = pool
        return pool

    def all_pools(self) -> list[Pool]:
        """The primary's pools and the replicas'."""
        pools = list(self.pools.values())
        if self.replicas is not None:
            pools += [p for r in self.replicas.list for p in r.pools.values()]
        return pools

    def publish_pids(self) -> None:
        """Our server connections changed: tell the other workers (own_pid)."""
        if self.shared is not None and self.shared.workers > 1:
            self.shared.set_pids(self.worker, {pid for p in self.pools.values() for pid in p.pids})

    def own_pid(self, pid: int) -> bool:
        """Is `pid` a server connection of this pgsluice (any worker)? Its writes were bumped by
        the session that sent them, before its client heard of the commit."""
        if any(pid in p.pids for p in self.pools.values()):
            return True
        return self.shared is not None and self.shared.workers > 1 and self.shared.has_pid(pid)

    def _auth_query(self, config: Config) -> AuthQuery | None:
        if not config.auth_query:
            return None
        user = config.auth_user or self.upstream_user
        password = config.auth_password or (self.upstream_password if user == self.upstream_user else None)
        return AuthQuery(config.auth_query, config.connect_timeout, host=self.upstream.host,
                         port=self.upstream.port, user=user, password=password,
                         database=self.admin_database(), ssl=self.upstream_ssl(),
                         server_settings={"application_name": "pgsluice auth"})

    def upstream_ssl(self) -> Any:
        """asyncpg's `ssl` argument for control connections (server_tls_mode, as the pool's)."""
        return asyncpg_ssl(self.upstream.tls, self.upstream.host)

    def default_creds(self, user: str) -> Credentials:
        if user == self.upstream_user and self.upstream_password is not None:
            return Credentials(password=self.upstream_password)
        return Credentials()

    def scram_secret_for(self, user: str, password: str) -> ScramSecret:
        key = (user, password)
        secret = self._scram_secrets.get(key)
        if secret is None:
            secret = self._scram_secrets[key] = make_scram_secret(password)
        return secret

    # ---- planner -------------------------------------------------------------------------------

    def planner_for(self, database: str) -> Planner:
        """The planner of one database; its catalog facts load in the background."""
        planner = self.planners.get(database)
        if planner is None:
            planner = self.planners[database] = Planner(policies=self.config.roles)
            if self.cache is not None:
                planner.on_change = self.cache.plans_changed
            self.spawn(self._load_catalog(database))
            if self.config.change_feed and self.tracks_writes:
                feed = ChangeFeed(database, lambda: self.control_connection(database), self._feed_change)
                if self.cache is not None:
                    self.cache.add_feed(feed)
                elif self.replicas is not None:  # the cache is off: the feed serves the replicas alone
                    self.replicas.feeds[database] = feed
                    feed.start()
        return planner

    def cache_rows(self) -> list[tuple[str, str]]:
        """SHOW CACHE: the cache's counters, and whether each database's catalog is loaded
        (until it is, nothing of that database is cacheable)."""
        assert self.cache is not None
        rows = [("worker_pid", str(os.getpid())), *self.cache.rows()]
        for db, planner in sorted(self.planners.items()):
            state = "loaded" if planner.catalog.loaded else "loading"
            rows.append((f"catalog {db}", f"{state}, {planner.stats.hits} plan hits, "
                         f"{planner.stats.misses} parsed"))
        return rows

    def ddl_seen(self, database: str) -> None:
        """DDL committed (here or elsewhere): plans made with the old catalog facts are not
        trusted (nothing is cacheable) until the catalog is read again."""
        planner = self.planners.get(database)
        if planner is None:
            return
        self._catalog_gen[database] = self._catalog_gen.get(database, 0) + 1
        planner.set_catalog(Catalog())
        self.refresh_catalog(database, delay=0.02)

    def _feed_change(self, database: str, change: Change) -> None:
        """A change-feed notification: bump what it (and what Postgres did because of it, by the
        catalog's foreign keys and partitions) can have changed."""
        planner = self.planners.get(database)
        facts = planner.catalog.tables if planner is not None else TableFacts()
        names = write_names(database, change_effects(change, facts), None)
        if self.replicas is not None and names and not (change.pid and self.own_pid(change.pid)):
            # before the versions move: a read of the new versions must not be filled from a
            # replica that has not replayed the write
            self.replicas.committed(database, names, "feed")
        if names and self.cache is not None:
            self.cache.feed_change(names, change.pid)
        if change.op == "*":
            self.ddl_seen(database)

    async def control_connection(self, database: str) -> asyncpg.Connection:
        """A connection of pgsluice's own (catalog loads, change feeds, health checks)."""
        return await asyncpg.connect(host=self.upstream.host, port=self.upstream.port,
                                     user=self.upstream_user, password=self.upstream_password,
                                     database=database, timeout=self.config.connect_timeout,
                                     ssl=self.upstream_ssl(),
                                     server_settings={"application_name": "pgsluice control"})

    def refresh_catalog(self, database: str, delay: float = 1.0) -> None:
        """DDL went through: reload the catalog facts soon (one reload per burst)."""
        if database in self._catalog_refresh or database not in self.planners:
            return
        self._catalog_refresh.add(database)
        asyncio.get_running_loop().call_later(delay, lambda: self.spawn(self._load_catalog(database)))

    async def _load_catalog(self, database: str) -> None:
        self._catalog_refresh.discard(database)
        gen = self._catalog_gen.get(database, 0)
        try:
            async with asyncio.timeout(self.config.connect_timeout * 2):
                conn = await self.control_connection(database)
                try:
                    catalog = await load_catalog(conn)
                finally:
                    await conn.close()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("catalog of database %s not loaded (%s): its plans are not cacheable", database, exc)
            return
        if self._catalog_gen.get(database, 0) != gen:
            return  # DDL went by while reading: the newer reload decides
        self.planners[database].set_catalog(catalog)

    # ---- admin console -------------------------------------------------------------------------

    def admin_users(self) -> set[str]:
        users = {u.strip() for u in self.config.admin_users.split(",") if u.strip()}
        return users or {self.upstream_user}

    def admin_database(self) -> str:
        """The database the admin console's logins and SHOW PLAN use: the upstream URL's."""
        return parse_upstream(self.config.upstream).database

    def admin_facts(self) -> SessionFacts:
        return SessionFacts(self.admin_database(), self.upstream_user)

    def _to_all_workers(self, sig: int) -> bool:
        """With several workers, an admin action goes to the parent, which signals them all."""
        if self.config.workers > 1 and self.stats_dir is not None:
            os.kill(os.getppid(), sig)
            return True
        return False

    def pause(self) -> str:
        if self._to_all_workers(signal.SIGUSR1):
            return f"pausing all {self.config.workers} workers: new transactions wait for RESUME"
        return self.pause_here()

    def paused_anywhere(self) -> bool:
        """Still paused (a RESUME ends the wait of a PAUSE)."""
        return self.paused or (self.config.workers > 1 and self.stats_dir is not None)

    def pause_here(self) -> str:
        self.paused = True
        active = sum(1 for c in self.clients if c.backend is not None)
        return f"paused: new transactions wait for RESUME (cache hits go on); {active} in progress"

    def resume(self) -> str:
        if self._to_all_workers(signal.SIGUSR2):
            return f"resuming all {self.config.workers} workers"
        return self.resume_here()

    def resume_here(self) -> str:
        self.paused = False
        parked, self.parked = self.parked, set()
        for client in parked:
            client.pump()
        return f"resumed: {len(parked)} waiting clients released"

    def request_shutdown(self) -> str:
        if not self._to_all_workers(signal.SIGTERM):
            self.stop_requested.set()
        return "shutting down: draining transactions"

    def reload_all(self) -> str:
        if self._to_all_workers(signal.SIGHUP):
            return f"reloading all {self.config.workers} workers"
        return self.reload()

    def reload(self) -> str:
        """Apply what can change safely: pool sizes and timeouts, guardrails, log level."""
        if self.reload_config is None:
            return "nothing to reload: no config source"
        from proxy.base.errors import ConfigError
        try:
            new = self.reload_config()
        except ConfigError as exc:
            log.error("configuration not reloaded: %s", exc)
            return f"not reloaded: {exc}"
        self.config = dataclasses.replace(
            self.config, pool_min_size=new.pool_min_size, pool_max_size=new.pool_max_size,
            pool_acquire_timeout=new.pool_acquire_timeout, server_idle_timeout=new.server_idle_timeout,
            server_lifetime=new.server_lifetime, max_client_conn=new.max_client_conn,
            idle_transaction_timeout=new.idle_transaction_timeout,
            log_level=new.log_level, roles=new.roles, admin_users=new.admin_users)
        settings = self.pool_settings()
        for pool in self.all_pools():
            pool.settings = settings
            pool.wake_for_capacity()
        for planner in self.planners.values():
            planner.set_policies(new.roles)
        logging.getLogger().setLevel(getattr(logging, new.log_level.upper(), logging.INFO))
        log.info("configuration reloaded")
        return "reloaded: pool sizes and timeouts, guardrails, log level, admin users"

    # ---- cancel --------------------------------------------------------------------------------

    def new_cancel_key(self, session: Session) -> tuple[int, bytes]:
        """A (process id, secret) for BackendKeyData; the low byte of the process id is this
        worker's index, so that a CancelRequest landing on another worker finds its way here."""
        while True:
            self._next_pid = (self._next_pid % _PID_COUNTER) + 1
            key = ((self._next_pid << 8) | self.worker, secrets.token_bytes(4))
            if key not in self.cancel_keys:
                self.cancel_keys[key] = session
                return key

    async def cancel(self, pid: int, secret: bytes) -> None:
        """A CancelRequest, from a client or a door; sent on to the worker owning the key."""
        owner = pid & 0xFF
        if owner != self.worker:
            if self.channel is not None:
                await self.channel.send(owner, CANCEL, _I.pack(pid) + secret)
            return
        await self.cancel_here(pid, secret)

    async def cancel_here(self, pid: int, secret: bytes) -> None:
        session = self.cancel_keys.get((pid, secret))
        if session is None:
            return  # like Postgres: no answer either way
        self.stats.cancels += 1
        backend = session.backend
        if backend is not None and session.entries:
            # by the time the cancel connection is open the query may be over and the server
            # connection serving someone else: then the cancel is not sent
            upstream = session.bpool.upstream if session.bpool is not None else self.upstream
            await send_cancel(upstream, backend.pid, backend.secret,
                              still=lambda: session.backend is backend and bool(session.entries))
        elif backend is None:
            session.cancel_wait()  # waiting for an identical query in flight: stop waiting

    async def _from_worker(self, kind: bytes, payload: bytes) -> None:
        """A request another worker sent over the channel."""
        if kind == CANCEL and len(payload) == 8:
            await self.cancel_here(_I.unpack_from(payload)[0], payload[4:])
        elif kind == CLOSE_DATABASE:
            self.let_go_of(payload.decode("utf-8", "replace"))

    # ---- databases going away -------------------------------------------------------------------

    def database_going(self, database: str) -> None:
        """DROP DATABASE or ALTER DATABASE ... RENAME of `database` is about to reach Postgres,
        which refuses while other sessions are connected to it (after waiting up to 5 s for
        them to go): every worker lets go of its idle connections to it first."""
        self.let_go_of(database)
        if self.channel is not None:
            self.spawn(self.channel.broadcast(CLOSE_DATABASE, database.encode()))

    def let_go_of(self, database: str) -> None:
        """Close this worker's idle server connections and change-feed listener of `database`
        (its planner and feed come back if it is used again)."""
        closed = sum(pool.close_idle() for pool in self.all_pools() if pool.database == database)
        feeds = self.cache.feeds if self.cache is not None else \
            self.replicas.feeds if self.replicas is not None else {}
        feed = feeds.pop(database, None)
        if feed is not None:
            self.spawn(feed.close())
            self.planners.pop(database, None)
        if closed or feed is not None:
            log.info("database %s about to be dropped or renamed: %d idle server connections%s closed",
                     database, closed, " and its change feed" if feed is not None else "")

    # ---- tasks ---------------------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    async def _janitor_loop(self) -> None:
        while True:
            await asyncio.sleep(1.0)
            for pool in self.all_pools():
                try:
                    await pool.maintain()
                except Exception:
                    log.exception("pool janitor failed for %s", pool.key)

    # ---- lifecycle -----------------------------------------------------------------------------

    async def open_channel(self) -> None:
        """With several workers, the channel to the others (before a client can come)."""
        if self.stats_dir is not None and self.config.workers > 1:
            self.channel = WorkerChannel(self.stats_dir, self.worker, self.config.workers, self._from_worker)
            await self.channel.start()

    def start_background(self) -> None:
        """The background work: the pools' janitor, replicas' polls, the cache and change
        feeds, the workers' published counters."""
        loop = asyncio.get_running_loop()
        self._janitor = loop.create_task(self._janitor_loop())
        if self.replicas is not None:
            self.replicas.start()
        if self.cache is not None or self.replicas is not None:
            if self.cache is not None:
                self.cache.start()
            if self.config.change_feed:
                # the upstream's database at once: its catalog, and a warning now if its reads
                # cannot be cached (no change feed there)
                self.planner_for(self.admin_database())
        if self.stats_dir is not None:
            self._publisher = loop.create_task(publish(self))

    async def drain(self, timeout: float) -> None:
        """Let sessions finish their transactions for up to `timeout`, then close the rest
        with 57P01."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while loop.time() < deadline:
            if all(c.backend is None for c in self.clients):
                break
            await asyncio.sleep(0.05)
        for client in list(self.clients):
            client.fatal(ADMIN_SHUTDOWN, "terminating connection due to administrator command")

    async def close(self) -> None:
        """Stop the background work and close pools, cache, replicas and tasks."""
        if self.channel is not None:
            self.channel.close()
        if self._janitor is not None:
            self._janitor.cancel()
        if self._publisher is not None:
            self._publisher.cancel()
        for pool in self.pools.values():
            pool.close()
        if self.cache is not None:
            await self.cache.close()
        if self.replicas is not None:
            await self.replicas.close()
        if self.batcher is not None:
            self.batcher.close()
        if self.auth_query is not None:
            await self.auth_query.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.sleep(0)
