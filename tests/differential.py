"""A randomized differential test of the cache's invalidation against Postgres itself.

Reads of many shapes (point, IN-list, range, joins, aggregates, SELECT *, row_to_json,
subqueries, CTEs, views, partitions) are run through pgsluice and directly on Postgres after
every write, and every answer must be equal. Writes of many shapes (point and range UPDATEs of
one or several columns, key-changing UPDATEs, INSERT, upserts, DELETE with cascades and SET NULL,
TRUNCATE, COPY FROM, writes through a view, into a partitioned table, into a table whose trigger
writes another) go through pgsluice (simple protocol, or extended with text or binary
parameters) or directly to Postgres — then the run waits until pgsluice's change feed has
processed the write (a marker row, updated directly after it, is read through pgsluice until
its new value shows: notifications arrive in commit order).

    run = Differential(direct_dsn, [proxy_dsn, ...], seed)
    run.setup(); stats = run.run(writes=200); run.close()

or, for a long recorded run against a proxy you started:

    python -m tests.differential --direct DSN --proxy DSN [--proxy DSN2] --writes 2000 --seed 1
"""

from __future__ import annotations

import argparse
import io
import random
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg
import psycopg2
import psycopg2.extensions
import psycopg2.extras

psycopg2.extras.register_uuid()

SCHEMA = """
DROP TABLE IF EXISTS feed_marker, audit, watched, events, uu, tags, plain_ref, pets, kids, parents CASCADE;
DROP VIEW IF EXISTS rich_parents, kid_counts;
CREATE TABLE parents (id int PRIMARY KEY, name text NOT NULL, code text UNIQUE, score int NOT NULL DEFAULT 0,
                      doubled int GENERATED ALWAYS AS (score * 2) STORED);
CREATE TABLE kids (id bigint PRIMARY KEY,
                   parent_id int REFERENCES parents ON DELETE CASCADE ON UPDATE CASCADE,
                   label text, n int NOT NULL DEFAULT 0);
CREATE TABLE pets (id int PRIMARY KEY, owner_id int REFERENCES parents ON DELETE SET NULL,
                   kind text NOT NULL);
CREATE TABLE plain_ref (id int PRIMARY KEY, parent_id int REFERENCES parents, note text);
CREATE TABLE tags (k text PRIMARY KEY, v text);
CREATE TABLE uu (u uuid PRIMARY KEY, v int);
CREATE TABLE events (id int, region text, amount int, PRIMARY KEY (id, region)) PARTITION BY LIST (region);
CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
CREATE TABLE audit (id bigserial PRIMARY KEY, what text);
CREATE TABLE watched (id int PRIMARY KEY, v int);
CREATE OR REPLACE FUNCTION log_watched() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN INSERT INTO audit (what) VALUES (TG_OP || ' ' || coalesce(NEW.id, OLD.id)); RETURN NULL; END $$;
CREATE TRIGGER watched_audit AFTER INSERT OR UPDATE OR DELETE ON watched
  FOR EACH ROW EXECUTE FUNCTION log_watched();
CREATE VIEW rich_parents AS SELECT id, name, score FROM parents WHERE score > 50;
CREATE VIEW kid_counts AS SELECT parent_id, count(*) AS n FROM kids GROUP BY parent_id;
CREATE TABLE feed_marker (id int PRIMARY KEY, n bigint NOT NULL);
INSERT INTO feed_marker VALUES (1, 0);
INSERT INTO parents (id, name, code, score) SELECT g, 'p' || g, 'c' || g, g * 3 FROM generate_series(1, 24) g;
INSERT INTO kids SELECT g, 1 + g % 24, 'k' || g, g % 7 FROM generate_series(1, 60) g;
INSERT INTO pets SELECT g, 1 + g % 20, (ARRAY['cat', 'dog', 'fish'])[1 + g % 3] FROM generate_series(1, 20) g;
INSERT INTO plain_ref SELECT g, 20 + g % 5, 'r' || g FROM generate_series(1, 8) g;
INSERT INTO tags SELECT 't' || g, 'v' || g FROM generate_series(1, 10) g;
INSERT INTO events SELECT g, (ARRAY['eu', 'us'])[1 + g % 2], g * 10 FROM generate_series(1, 10) g;
INSERT INTO watched SELECT g, g FROM generate_series(1, 6) g;
"""
UUIDS = [uuid.UUID(int=(i * 0x9E3779B97F4A7C15) % (1 << 128)) for i in range(1, 9)]
KINDS = ["cat", "dog", "fish", "owl"]
BURST = 8  # point reads of one shape sent at once after each write, for burst batching

Stmt = tuple[str, tuple[Any, ...]]  # SQL with %s placeholders, and the values


@dataclass
class Stats:
    reads: int = 0
    writes: int = 0
    write_errors: int = 0
    direct_writes: int = 0
    burst_reads: int = 0  # of reads: sent at the same moment as others of their shape (batching)
    mismatches: list[str] = field(default_factory=list)

    @property
    def operations(self) -> int:
        return self.reads + self.writes


class Differential:
    def __init__(self, direct_dsn: str, proxy_dsns: list[str], seed: int) -> None:
        self.rng = random.Random(seed)
        self.direct_dsn, self.proxy_dsns = direct_dsn, proxy_dsns
        self.stats = Stats()
        self.history: list[str] = []  # the last writes, for a mismatch report
        self.marker = 0
        self.bursts = 0

    # ---- connections ----

    def connect(self) -> None:
        self.d2 = psycopg2.connect(self.direct_dsn)
        self.d2.autocommit = True
        self.d3 = psycopg.connect(self.direct_dsn, autocommit=True)
        self.p2 = []
        self.p3 = []
        for dsn in self.proxy_dsns:
            c2 = psycopg2.connect(dsn)
            c2.autocommit = True
            self.p2.append(c2)
            self.p3.append(psycopg.connect(dsn, autocommit=True))
        self.b2: list[list[psycopg2.extensions.connection]] = []
        self.b3: list[list[psycopg.Connection[Any]]] = []
        for dsn in self.proxy_dsns:
            self.b2.append([psycopg2.connect(dsn) for _ in range(BURST)])
            for c2 in self.b2[-1]:
                c2.autocommit = True
            self.b3.append([psycopg.connect(dsn, autocommit=True) for _ in range(BURST)])

    def setup(self) -> None:
        with psycopg2.connect(self.direct_dsn) as conn:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(SCHEMA)
                from cache.feed import INSTALL
                cur.execute(INSTALL)
        conn.close()
        self.connect()

    def close(self) -> None:
        for c in [self.d2, *self.p2, *(c for cs in self.b2 for c in cs)]:
            c.close()
        for c3 in [self.d3, *self.p3, *(c for cs in self.b3 for c in cs)]:
            c3.close()

    # ---- the random statements ----

    def p(self) -> int:
        return self.rng.randint(1, 30)

    def k(self) -> int:
        return self.rng.randint(1, 70)

    def reads(self) -> list[Stmt]:
        """A fresh sample of reads, every shape once (keys drawn from small domains, so the
        same reads come back and are answered from cache between writes)."""
        r, p, k = self.rng, self.p, self.k
        e, region, t, u = r.randint(1, 10), r.choice(["eu", "us"]), f"t{r.randint(1, 12)}", r.choice(UUIDS)
        x = r.randint(0, 8)
        return [
            ("SELECT name, score FROM parents WHERE id = %s", (p(),)),
            ("SELECT * FROM parents WHERE id = %s", (p(),)),
            ("SELECT doubled FROM parents WHERE id = %s", (p(),)),
            ("SELECT id, name FROM parents WHERE code = %s", (f"c{p()}",)),
            ("SELECT id, label FROM kids WHERE id IN (%s, %s, %s) ORDER BY id", (k(), k(), k())),
            ("SELECT id, score FROM parents WHERE id BETWEEN %s AND %s ORDER BY id", (x * 3, x * 3 + 5)),
            ("SELECT p.name, count(k.id) FROM parents p LEFT JOIN kids k ON k.parent_id = p.id "
             "WHERE p.id = %s GROUP BY p.name", (p(),)),
            ("SELECT count(*), sum(score), max(name) FROM parents", ()),
            ("SELECT parent_id, count(*), sum(n) FROM kids GROUP BY 1 ORDER BY 1 NULLS FIRST", ()),
            ("SELECT kind, count(*) FROM pets WHERE owner_id IS NULL GROUP BY 1 ORDER BY 1", ()),
            ("SELECT * FROM pets ORDER BY id", ()),
            ("SELECT * FROM tags WHERE k = %s", (t,)),
            ("SELECT row_to_json(p) FROM parents p WHERE id = %s", (p(),)),
            ("SELECT id FROM parents WHERE id IN (SELECT parent_id FROM kids WHERE n > %s) ORDER BY id",
             (x,)),
            ("WITH s AS (SELECT parent_id, sum(n) AS t FROM kids GROUP BY 1) "
             "SELECT * FROM s WHERE t > %s ORDER BY 1", (x,)),
            ("SELECT * FROM rich_parents ORDER BY id", ()),
            ("SELECT * FROM kid_counts WHERE parent_id = %s", (p(),)),
            ("SELECT region, sum(amount), count(*) FROM events GROUP BY 1 ORDER BY 1", ()),
            ("SELECT * FROM events_eu WHERE id = %s", (e,)),
            ("SELECT amount FROM events WHERE id = %s AND region = %s", (e, region)),
            ("SELECT v FROM uu WHERE u = %s", (u,)),
            ("SELECT count(*), max(what) FROM audit", ()),
            ("SELECT * FROM watched WHERE id = %s", (r.randint(1, 8),)),
            ("SELECT count(*) FROM plain_ref WHERE parent_id = %s", (p(),)),
            ("SELECT id, label FROM kids WHERE id = ANY(%s) ORDER BY id", ([k(), k()],)),
            ("SELECT k.label, p.name FROM kids k JOIN parents p ON p.id = k.parent_id WHERE k.id = %s",
             (k(),)),
            ("SELECT name FROM parents WHERE id = %s AND score > %s", (p(), x * 5)),
            ("SELECT count(*) FROM kids WHERE parent_id = %s", (p(),)),
            ("SELECT id, n FROM kids WHERE id = %s", (k(),)),
            ("SELECT t.k, t.v FROM tags t ORDER BY 1", ()),
            ("SELECT id, name, score FROM parents ORDER BY id", ()),
            ("SELECT u, v FROM uu ORDER BY u", ()),
        ]

    def write(self) -> list[Stmt]:
        """One write (a list: a transaction when longer than one)."""
        r, p, k = self.rng, self.p, self.k
        x = r.randint(0, 100)
        e, region, u = r.randint(1, 10), r.choice(["eu", "us"]), r.choice(UUIDS)
        choices: list[tuple[float, Callable[[], list[Stmt]]]] = [
            (8, lambda: [("UPDATE parents SET score = %s WHERE id = %s", (x, p()))]),
            (4, lambda: [("UPDATE parents SET name = %s, score = score + 1 WHERE id = %s", (f"n{x}", p()))]),
            (3, lambda: [("UPDATE kids SET n = n + 1 WHERE id BETWEEN %s AND %s", (x % 60, x % 60 + 4))]),
            (5, lambda: [("UPDATE kids SET label = %s WHERE id = %s", (f"l{x}", k()))]),
            (2, lambda: [("UPDATE parents SET id = %s WHERE id = %s", (p(), p()))]),
            (3, lambda: [("INSERT INTO parents (id, name, code, score) VALUES (%s, %s, %s, %s)",
                          (v := p(), f"i{x}", f"c{v}", x))]),
            (3, lambda: [("INSERT INTO tags VALUES (%s, %s) ON CONFLICT (k) DO UPDATE SET v = EXCLUDED.v",
                          (f"t{r.randint(1, 12)}", f"w{x}"))]),
            (2, lambda: [("INSERT INTO parents (id, name, code) VALUES (%s, %s, %s) "
                          "ON CONFLICT (code) DO UPDATE SET name = EXCLUDED.name",
                          (p(), f"u{x}", f"c{p()}"))]),
            (2, lambda: [("DELETE FROM parents WHERE id = %s", (p(),))]),
            (1, lambda: [("DELETE FROM kids WHERE n > %s", (r.randint(4, 12),))]),
            (4, lambda: [("INSERT INTO kids (id, parent_id, label, n) VALUES (%s, %s, %s, %s)",
                          (k(), p(), f"a{x}", x % 5))]),
            (2, lambda: [("INSERT INTO pets VALUES (%s, %s, %s)", (r.randint(1, 30), p(), r.choice(KINDS)))]),
            (2, lambda: [("UPDATE pets SET kind = %s WHERE id = %s", (r.choice(KINDS), r.randint(1, 30)))]),
            (2, lambda: [("UPDATE pets SET owner_id = %s WHERE id = %s", (p(), r.randint(1, 30)))]),
            (0.3, lambda: [("TRUNCATE kids", ())]),
            (0.3, lambda: [("TRUNCATE audit", ())]),
            (1.5, lambda: [("COPY kids (id, parent_id, label, n) FROM STDIN", (k(), p(), f"copy{x}", 1))]),
            (3, lambda: [("UPDATE watched SET v = v + %s WHERE id = %s", (x, r.randint(1, 8)))]),
            (1, lambda: [("INSERT INTO watched VALUES (%s, %s) ON CONFLICT DO NOTHING",
                          (r.randint(1, 8), x))]),
            (1, lambda: [("DELETE FROM watched WHERE id = %s", (r.randint(1, 8),))]),
            (3, lambda: [("UPDATE events SET amount = %s WHERE id = %s AND region = %s", (x, e, region))]),
            (1, lambda: [("UPDATE events SET region = %s WHERE id = %s AND region = %s",
                          ("us" if region == "eu" else "eu", e, region))]),
            (1, lambda: [("INSERT INTO events VALUES (%s, %s, %s)", (e, region, x))]),
            (2, lambda: [("UPDATE uu SET v = %s WHERE u = %s", (x, u))]),
            (1, lambda: [("DELETE FROM uu WHERE u = %s", (u,))]),
            (2, lambda: [("INSERT INTO uu VALUES (%s, %s) ON CONFLICT (u) DO UPDATE SET v = EXCLUDED.v",
                          (u, x))]),
            (2, lambda: [("UPDATE rich_parents SET name = %s WHERE id = %s", (f"r{x}", p()))]),
            (0.5, lambda: [("UPDATE parents SET score = score + 1", ())]),
            (1, lambda: [("DELETE FROM kids WHERE id = ANY(%s)", ([k(), k(), k()],))]),
            (1, lambda: [("INSERT INTO plain_ref VALUES (%s, %s, %s)", (r.randint(1, 12), p(), f"z{x}"))]),
            (2, lambda: [("UPDATE parents SET score = %s WHERE id = %s", (x, p())),
                         ("UPDATE kids SET n = %s WHERE id = %s", (x % 9, k())),
                         ("DELETE FROM tags WHERE k = %s", (f"t{r.randint(1, 12)}",))]),
        ]
        weights = [w for w, _ in choices]
        return r.choices([f for _, f in choices], weights)[0]()

    # ---- running them ----

    def _read_one(self, stmt: Stmt, via: int) -> None:
        sql, params = stmt
        mode = self.rng.choice(("simple", "text", "binary"))
        try:
            if mode == "simple":
                got = _fetch2(self.p2[via], sql, params)
                want = _fetch2(self.d2, sql, params)
            else:
                q = sql.replace("%s", "%b") if mode == "binary" else sql
                got = _fetch3(self.p3[via], q, params)
                want = _fetch3(self.d3, q, params)
        except Exception as exc:
            self.stats.mismatches.append(f"read failed: {sql} {params} via {via} {mode}: {exc!r}")
            return
        self.stats.reads += 1
        if got != want:
            self.stats.mismatches.append(
                f"op {self.stats.operations}: {sql} {params} via proxy {via} ({mode}):\n"
                f"  pgsluice {got!r}\n  postgres {want!r}\n  after: {self.history[-3:]}")

    def _burst(self, via: int) -> None:
        """BURST point reads of one batchable shape with other keys, sent at the same moment on
        BURST connections: all but the first usually run as one batch (a fresh literal in the
        select list makes them cache misses)."""
        self.bursts += 1
        r, p, k = self.rng, self.p, self.k
        sql, key = r.choice([
            ("SELECT id, name, score, doubled, %s::int AS burst FROM parents WHERE id = %s", p),
            ("SELECT label, n, %s::int AS burst FROM kids WHERE id = %s", k),
            ("SELECT v, %s::int AS burst FROM tags WHERE k = %s", lambda: f"t{r.randint(1, 12)}"),
            ("SELECT v, %s::int AS burst FROM uu WHERE u = %s", lambda: r.choice(UUIDS)),
        ])
        params = [(self.bursts, key()) for _ in range(BURST)]
        mode = r.choice(("simple", "text", "binary"))
        q = sql.replace("%s", "%b") if mode == "binary" else sql
        got: list[object] = [None] * BURST
        barrier = threading.Barrier(BURST)

        def one(i: int) -> None:
            try:
                barrier.wait(5)
                got[i] = _fetch2(self.b2[via][i], q, params[i]) if mode == "simple" else \
                    _fetch3(self.b3[via][i], q, params[i])
            except Exception as exc:
                got[i] = exc

        threads = [threading.Thread(target=one, args=(i,)) for i in range(BURST)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(BURST):
            want = _fetch2(self.d2, q, params[i]) if mode == "simple" else _fetch3(self.d3, q, params[i])
            self.stats.reads += 1
            self.stats.burst_reads += 1
            if got[i] != want:
                self.stats.mismatches.append(
                    f"op {self.stats.operations}: burst {q} {params[i]} via proxy {via} ({mode}):\n"
                    f"  pgsluice {got[i]!r}\n  postgres {want!r}\n  after: {self.history[-3:]}")

    def _write_via_proxy(self, stmts: list[Stmt], via: int) -> None:
        mode = self.rng.choice(("simple", "text", "binary"))
        if len(stmts) > 1 or stmts[0][0].startswith("COPY"):
            mode = "simple"
        self.history.append(f"{stmts} via proxy {via} ({mode})")
        if mode == "simple":
            self.stats.write_errors += not _write2(self.p2[via], stmts)
        else:
            conn = self.p3[via]
            sql, params = stmts[0]
            q = sql.replace("%s", "%b") if mode == "binary" else sql
            try:
                conn.execute(q, params)
            except psycopg.Error:
                self.stats.write_errors += 1

    def _write_direct(self, stmts: list[Stmt]) -> None:
        self.history.append(f"{stmts} directly")
        self.stats.direct_writes += 1
        self.stats.write_errors += not _write2(self.d2, stmts)
        self._wait_feed()

    def _wait_feed(self) -> None:
        """Until every proxy has processed the change feed's notifications so far: the
        marker's, sent last, has invalidated its cached read there."""
        with self.d2.cursor() as cur:
            cur.execute("UPDATE feed_marker SET n = n + 1 WHERE id = 1 RETURNING n")
            row = cur.fetchone()
        assert row is not None
        self.marker = row[0]
        for conn in self.p2:
            deadline = time.monotonic() + 15
            while _fetch2(conn, "SELECT n FROM feed_marker WHERE id = 1", ()) != [(self.marker,)]:
                if time.monotonic() > deadline:
                    raise TimeoutError("the change feed did not deliver the marker within 15 s")
                time.sleep(0.002)

    def run(self, writes: int, reads_per_write: int = 0) -> Stats:
        reads = self.reads()
        for i in range(writes):
            for via in range(len(self.p2)):  # the marker read is cached everywhere
                _fetch2(self.p2[via], "SELECT n FROM feed_marker WHERE id = 1", ())
            stmts = self.write()
            if self.rng.random() < 0.3:
                self._write_direct(stmts)
            else:
                self._write_via_proxy(stmts, self.rng.randrange(len(self.p2)))
            self.stats.writes += 1
            if i % 10 == 0:
                reads = self.reads()  # new keys now and then; the same between
            for stmt in reads[:reads_per_write or len(reads)]:
                self._read_one(stmt, self.rng.randrange(len(self.p2)))
            self._burst(self.rng.randrange(len(self.p2)))
            if len(self.stats.mismatches) > 20:
                break
        return self.stats


def _fetch2(conn: psycopg2.extensions.connection, sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    with conn.cursor() as cur:
        cur.execute(sql, params)
        return list(cur.fetchall())


def _fetch3(conn: psycopg.Connection[Any], sql: str, params: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    return list(conn.execute(sql, params).fetchall())


def _write2(conn: psycopg2.extensions.connection, stmts: list[Stmt]) -> bool:
    with conn.cursor() as cur:
        try:
            if len(stmts) > 1:
                cur.execute("BEGIN")
            for sql, params in stmts:
                if sql.startswith("COPY"):
                    cur.copy_expert(sql, io.StringIO("\t".join(str(v) for v in params) + "\n"))
                else:
                    cur.execute(sql, params)
            if len(stmts) > 1:
                cur.execute("COMMIT")
        except psycopg2.Error:
            if len(stmts) > 1:
                cur.execute("ROLLBACK")
            return False
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--direct", required=True, help="DSN of Postgres itself")
    ap.add_argument("--proxy", action="append", required=True, help="DSN through pgsluice (repeatable)")
    ap.add_argument("--writes", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--setup", action="store_true", help="create the schema first (drops its tables)")
    args = ap.parse_args()
    run = Differential(args.direct, args.proxy, args.seed)
    if args.setup:
        run.setup()
    else:
        run.connect()
    started = time.monotonic()
    stats = run.run(args.writes)
    run.close()
    print(f"seed {args.seed}: {stats.operations} operations ({stats.reads} reads compared, {stats.writes} "
          f"writes, {stats.direct_writes} of them directly on Postgres, {stats.write_errors} refused by "
          f"Postgres) in {time.monotonic() - started:.0f} s: {len(stats.mismatches)} mismatches")
    for m in stats.mismatches:
        print(m)
    return 1 if stats.mismatches else 0


if __name__ == "__main__":
    sys.exit(main())
