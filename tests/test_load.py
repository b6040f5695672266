"""The load generator: profiles validate; a short run adds up; latency is measured from the
intended start (a target slower than the offered rate shows as latency, not fewer samples);
several generator processes add up to the same schedule; --find-max finds a capacity that a
pool of one server connection bounds; gRPC targets; `pgsluice load` compares side by side."""

from __future__ import annotations

import dataclasses
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.agents import Plan, _Conn, run, schedule
from loadtest.findmax import Slo, find_max
from loadtest.load import Target, measure
from loadtest.profiles import PROFILES, ProfileError, SpeculateProfile, load_profile
from loadtest.sample import SCHEMAS
from proxy.ops.embedded import EmbeddedPostgres, free_port
from tests.util import ProxyFactory

DB = "loadtest"
ROOT = Path(__file__).resolve().parent.parent


def _database(pg: EmbeddedPostgres, db: str, schema: str) -> str:
    from cache.feed import INSTALL
    pg.psql(f"DROP DATABASE IF EXISTS {db} WITH (FORCE); CREATE DATABASE {db}")
    pg.psql(SCHEMAS[schema](1), db=db)
    pg.psql(INSTALL, db=db)
    return pg.dsn(database=db)


@pytest.fixture(scope="module")
def sample(pg: EmbeddedPostgres) -> str:
    return _database(pg, DB, "sample")


@pytest.fixture(scope="module")
def shop(pg: EmbeddedPostgres) -> str:
    return _database(pg, f"{DB}_shop", "shop")


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.toml")), ids=lambda p: p.stem)
async def test_profiles_validate_and_run(path: Path, request: pytest.FixtureRequest) -> None:
    """Every shipped profile loads, draws parameters, and runs on the schema it names (the
    sample schema unless it says otherwise) without an error (so a profile's SQL can't rot)."""
    profile = load_profile(str(path))
    assert profile.name == path.stem
    dsn = request.getfixturevalue(profile.schema)  # a fixture per schema of loadtest/sample.py
    stream = profile.stream(random.Random(1))
    for _ in range(200):
        sql, params = next(stream)
        assert sql and "{" not in sql and all(p is not None for p in params)
    out = await run(Plan(dsn, str(path), agents=2, rate=100, duration=1, seed=3))
    assert out["errors"] == 0, out["error_kinds"]
    assert out["sent"] == out["ok"] == out["scheduled"] > 100


def test_bad_profiles_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[query]]\nsql = "SELECT $1"\nweight = 1\n')
    with pytest.raises(ProfileError, match="1 placeholders but 0 params"):
        load_profile(str(bad))
    bad.write_text('[[query]]\nsql = "SELECT 1"\nweight = -1\n')
    with pytest.raises(ProfileError, match="weight must be positive"):
        load_profile(str(bad))
    bad.write_text('kind = "speculate"\n[[phase]]\nqueries = ["SELECT {nope} FROM t"]\n'
                   '[[topic]]\ntable = "t"\n')
    with pytest.raises(ProfileError, match="lacks 'nope'"):
        load_profile(str(bad))
    bad.write_text('[[query]]\nsql = "SELECT $2"\nparams = [{ dist = "uniform", min = 1, max = 2 }]\n')
    with pytest.raises(ProfileError, match="without gaps"):
        load_profile(str(bad))
    bad.write_text('kind = "guess"\n')
    with pytest.raises(ProfileError, match="unknown kind"):
        load_profile(str(bad))
    bad.write_text('schema = "pagila"\n[[query]]\nsql = "SELECT 1"\n')
    with pytest.raises(ProfileError, match="unknown schema 'pagila'"):
        load_profile(str(bad))


def test_speculating_attempts_share_most_sub_queries() -> None:
    """As in the agent-first study (arXiv 2509.00997): across 50 parallel attempts at a task,
    distinct sub-queries are a small share of those issued; each phase's shared query comes
    from every attempt side by side."""
    profile = load_profile("agent-speculate")
    assert isinstance(profile, SpeculateProfile)
    fifty = dataclasses.replace(profile, attempts=50)
    per_task = sum(len(queries) for _, queries in fifty.phases) * 50
    stream = fifty.stream(random.Random(5))
    for _ in range(5):  # five tasks, one at a time
        task = [next(stream)[0] for _ in range(per_task)]
        assert len(set(task)) / len(task) < 0.15, len(set(task))
    agreed = dataclasses.replace(profile, attempts=50, diverge=0.0).stream(random.Random(2))
    side_by_side = [next(agreed)[0] for _ in range(100)]  # every attempt asks, then the next query
    assert len(set(side_by_side[:50])) == 1 and len(set(side_by_side[50:])) == 1
    assert side_by_side[0] != side_by_side[50]


def test_schedule_is_poisson_at_the_rate_and_bursts() -> None:
    times = schedule(random.Random(3), 100, 20, 1, 0)
    assert 1800 < len(times) < 2200 and times == sorted(times)
    bursty = schedule(random.Random(3), 100, 20, 5, 0.05)
    assert len(bursty) < len(times)  # pauses take time: fewer in the same window
    plan = Plan("", "agent-explore", agents=3, rate=50, duration=2, warmup=1)
    for times in plan.schedules():  # warm-up starts are negative, the recorded part is 0..2 s
        assert times[0] < 0 < times[-1] < 2


async def test_short_run_adds_up(sample: str) -> None:
    out = await run(Plan(sample, "agent-explore", agents=4, rate=50, duration=2, seed=7, warmup=0.5))
    assert out["sent"] == out["ok"] + out["errors"] == out["scheduled"]
    assert out["unsent"] == 0 and out["errors"] == 0, out["error_kinds"]
    assert out["latency_ms"]["p50"] > 0 and out["latency_ms"]["p99"] >= out["latency_ms"]["p50"]
    assert sum(s["ok"] for s in out["timeline"]) == out["ok"]
    assert [p for p, _ in out["cdf"]] == sorted(p for p, _ in out["cdf"])
    recorded = sum(1 for times in Plan(sample, "agent-explore", 4, 50, 2, 7, warmup=0.5).schedules()
                   for t in times if t >= 0)
    assert out["scheduled"] == recorded  # the warm-up was run but not counted


async def test_latency_counts_from_the_intended_start(sample: str, tmp_path: Path) -> None:
    """A target that takes 50 ms per query, offered 40 queries/s on one connection: each
    query waits behind the previous ones, so latency grows far past 50 ms. A closed-loop
    generator would report ~50 ms and quietly send fewer queries."""
    slow = tmp_path / "slow.toml"
    slow.write_text('name = "slow"\n[[query]]\nsql = "SELECT pg_sleep(0.05)"\nweight = 1\n')
    out = await run(Plan(sample, str(slow), agents=1, rate=40, duration=2, seed=1, grace=5))
    assert out["sent"] == out["scheduled"] and out["errors"] == 0
    assert out["latency_ms"]["p99"] > 500, out["latency_ms"]  # the backlog, measured
    assert out["latency_ms"]["p50"] > 100
    assert out["achieved_qps"] < 0.8 * out["offered_qps"]  # and the shortfall is reported


async def test_a_stalled_target_ends_the_run_with_unsent_counted(sample: str, tmp_path: Path) -> None:
    stall = tmp_path / "stall.toml"
    stall.write_text('name = "stall"\n[[query]]\nsql = "SELECT pg_sleep(30)"\nweight = 1\n')
    out = await run(Plan(sample, str(stall), agents=2, rate=20, duration=1, grace=1))
    assert out["error_kinds"].get("deadline") == 2  # the query in flight, per agent
    assert out["ok"] == 0 and out["unsent"] > 20 and out["error_rate"] == 1.0
    assert out["sent"] + out["unsent"] == out["scheduled"]


async def test_several_processes_run_the_same_schedule(sample: str) -> None:
    plan = Plan(sample, "point-reads", agents=4, rate=50, duration=2, seed=11, warmup=0.5)
    one, two = await run(plan, processes=1), await run(plan, processes=2)
    assert one["scheduled"] == two["scheduled"] == two["sent"] == two["ok"]
    assert two["errors"] == 0 and sum(s["ok"] for s in two["timeline"]) == two["ok"]
    assert two["latency_ms"]["p99"] is not None


async def test_find_max_is_bounded_by_the_targets_capacity(sample: str, proxy_factory: ProxyFactory,
                                                          tmp_path: Path) -> None:
    """pgsluice with one server connection and 20 ms queries serves at most 50 queries/s: at
    10 queries/s per agent no more than 5 agents can hold a 150 ms p99, and more must fail."""
    proxy = proxy_factory("--pool-max-size", "1", "--pool-acquire-timeout", "30")
    work = tmp_path / "sleep.toml"
    work.write_text('name = "sleep"\n[[query]]\nsql = "SELECT pg_sleep(0.02)"\nweight = 1\n')
    target = Target("pgsluice", proxy.dsn(database=DB))
    plan = Plan("", str(work), agents=1, rate=10, duration=2, warmup=0.5, grace=2)
    found = await find_max(plan, lambda p: measure(target, p), Slo(p99_ms=150), settle=0.5, limit=64)
    steps = found["steps"]
    assert 1 <= found["max_agents"] <= 5, steps
    assert any(not s["passed"] for s in steps) and not found["limit_reached"]
    for s in steps:
        assert s["passed"] == (s["p99_ms"] is not None and s["p99_ms"] <= 150 and s["error_rate"] <= 0.001)
    assert found["best_run"]["agents"] == found["max_agents"]


async def test_grpc_target(pg: EmbeddedPostgres, sample: str, proxy_factory: ProxyFactory,
                           tmp_path: Path) -> None:
    config = tmp_path / "pgsluice.toml"
    config.write_text('[pgsluice.agents.loader]\ntoken = "load-token"\nuser = "postgres"\n'
                      f'password = "postgres"\ndatabase = "{DB}"\n')
    port = free_port()
    proxy_factory("--config", str(config), "--grpc-listen", f"127.0.0.1:{port}")
    for options, stream in (("", True), ("?calls=unary", False), ("?format=typed", True)):
        url = f"grpc://load-token@127.0.0.1:{port}/{DB}{options}"
        conn = _Conn(url)
        await conn.open()  # agents go through the Session stream unless told otherwise
        assert conn.grpc is not None and conn.grpc.stream is stream
        await conn.close()
        out = await run(Plan(url, "point-reads", agents=2, rate=50, duration=1.5, warmup=0.5))
        assert out["errors"] == 0, (options, out["error_kinds"])
        assert out["sent"] == out["ok"] == out["scheduled"] > 50
    bad = await run(Plan(f"grpc://wrong@127.0.0.1:{port}/{DB}", "point-reads", agents=1, rate=20,
                         duration=0.5))
    assert bad["ok"] == 0 and bad["errors"] == bad["sent"] > 0  # refused, counted, not hidden


def test_pgsluice_load_compares_side_by_side(pg: EmbeddedPostgres, sample: str,
                                            proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    mport = free_port()
    proxy = proxy_factory("--metrics-listen", f"127.0.0.1:{mport}")
    out = tmp_path / "out.json"
    res = subprocess.run([sys.executable, "-m", "proxy", "load", "--target", f"direct={sample}",
                          "--target", f"pgsluice={proxy.dsn(database=DB)}", "--compare",
                          "--metrics", f"pgsluice=http://127.0.0.1:{mport}/metrics", "--profile",
                          "point-reads", "--agents", "2", "--rate", "50", "--duration", "2", "--warmup", "1",
                          "--json", str(out), "--report", str(tmp_path / "report.html")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    data = json.loads(out.read_text())
    assert data["profile"] == "point-reads" and set(data["targets"]) == {"direct", "pgsluice"}
    direct, sluice = data["targets"]["direct"], data["targets"]["pgsluice"]
    assert direct["sent"] == sluice["sent"] == direct["scheduled"]  # the same schedule for both
    for result in (direct, sluice):
        assert result["sent"] == result["ok"] + result["errors"] and result["errors"] == 0
    assert direct["kind"] == "direct" and direct["reached_postgres"] == 1.0
    # warmed up on Zipf keys: most answers came from the cache, counted from pgsluice's /metrics
    assert sluice["kind"] == "pgsluice" and sluice["pgsluice"]["hits"] > 0
    assert 0 < sluice["reached_postgres"] < 0.5 and sluice["pgsluice"]["upstream"] > 0
    assert "pgsluice" in res.stdout and "reached PG" in res.stdout
    assert (tmp_path / "report.html").exists() and (tmp_path / "report-throughput.png").exists()


def test_bad_arguments_exit_2(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "proxy", "load", "--target", "postgresql://x/y",
                          "--profile", str(tmp_path / "missing.toml")],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2 and "missing.toml" in res.stderr


def test_a_refused_target_is_reported_not_hidden(tmp_path: Path) -> None:
    port = free_port()  # nothing listens there
    out = tmp_path / "refused.json"
    res = subprocess.run([sys.executable, "-m", "proxy", "load", "--target",
                          f"gone=postgresql://u:p@127.0.0.1:{port}/db", "--metrics",
                          f"gone=http://127.0.0.1:{port}/metrics", "--agents", "2", "--rate", "20",
                          "--duration", "1", "--warmup", "0", "--json", str(out)],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 1, res.stdout + res.stderr
    gone = json.loads(out.read_text())["targets"]["gone"]
    assert gone["ok"] == gone["sent"] == 0 and gone["unsent"] == gone["scheduled"] > 0
    assert "no query succeeded (unsent: connect: ConnectionRefusedError" in res.stderr
    assert "cannot read http://" in res.stderr


async def test_find_max_search_doubles_bisects_and_tries_the_limit() -> None:
    """The search itself, over a stand-in for a run whose capacity is known exactly (the
    load runs it drives are tested against real targets above)."""
    def fake(capacity: int):  # type: ignore[no-untyped-def]
        async def runner(p: Plan) -> dict[str, object]:
            ok = p.agents <= capacity
            return {"latency_ms": {"p50": 1.0, "p99": 10.0 if ok else 500.0}, "error_rate": 0.0,
                    "offered_qps": p.agents * p.rate, "achieved_qps": p.agents * p.rate,
                    "generator_cpu_fraction": 0.1, "agents": p.agents}
        return runner
    plan = Plan("", "point-reads", agents=1, rate=100, duration=1)
    found = await find_max(plan, fake(37), Slo(), settle=0)
    tried = [s["agents"] for s in found["steps"]]
    assert tried[:7] == [1, 2, 4, 8, 16, 32, 64] and 33 <= found["max_agents"] <= 37
    assert found["max_agents"] in tried and not found["limit_reached"]
    capped = await find_max(plan, fake(1000), Slo(), start=3, limit=40, settle=0)
    assert [s["agents"] for s in capped["steps"]] == [3, 6, 12, 24, 40]
    assert capped["max_agents"] == 40 and capped["limit_reached"]
    none = await find_max(plan, fake(0), Slo(), settle=0)
    assert none["max_agents"] == 0 and none["best_run"]["agents"] == 1  # the first step, shown


async def test_a_failing_generator_process_is_an_error_not_a_hang(sample: str, tmp_path: Path) -> None:
    import time
    gone = tmp_path / "gone.toml"  # the children load the profile themselves: it is not there
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="generator process failed: ProfileError"):
        await run(Plan(sample, str(gone), agents=2, rate=10, duration=5), processes=2)
    assert time.monotonic() - started < 15


async def test_offered_rate_is_what_the_schedule_offered(sample: str) -> None:
    plan = Plan(sample, "point-reads", agents=2, rate=100, duration=2, burst=5, pause=0.05)
    out = await run(plan)
    assert out["offered_qps"] == out["scheduled"] / 2 < 0.8 * 200  # the pauses offer less than 2 x 100
    assert out["achieved_qps"] >= 0.9 * out["offered_qps"]


def test_start_above_the_limit_is_refused() -> None:
    res = subprocess.run([sys.executable, "-m", "proxy", "load", "--target", "postgresql://x/y", "--find-max",
                          "--start-agents", "8", "--max-agents", "4"],
                         capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert res.returncode == 2 and "--start-agents must not be above --max-agents" in res.stderr
