"""The load generator: profiles validate; a short run adds up; latency is measured from the
intended start (a target slower than the offered rate shows as latency, not fewer samples)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loadtest.load import PROFILES, ProfileError, load_profile, run, schedule
from loadtest.sample import schema_sql
from proxy.embedded import EmbeddedPostgres
from tests.util import ProxyFactory

DB = "loadtest"


@pytest.fixture(scope="module")
def sample(pg: EmbeddedPostgres) -> str:
    pg.psql(f"DROP DATABASE IF EXISTS {DB} WITH (FORCE); CREATE DATABASE {DB}")
    pg.psql(schema_sql(1), db=DB)
    return pg.dsn(database=DB)


@pytest.mark.parametrize("path", sorted(PROFILES.glob("*.toml")), ids=lambda p: p.stem)
def test_profiles_validate(path: Path) -> None:
    profile = load_profile(str(path))
    assert profile.templates and profile.name == path.stem
    import random
    rng = random.Random(1)
    for _ in range(200):  # every template draws parameters in range
        sql, params = profile.draw(rng)
        assert sql and all(p is not None for p in params)


def test_bad_profiles_are_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[[query]]\nsql = "SELECT $1"\nweight = 1\n')
    with pytest.raises(ProfileError, match="1 placeholders but 0 params"):
        load_profile(str(bad))
    bad.write_text('[[query]]\nsql = "SELECT 1"\nweight = -1\n')
    with pytest.raises(ProfileError, match="weight must be positive"):
        load_profile(str(bad))


def test_schedule_is_poisson_at_the_rate_and_bursts() -> None:
    import random
    times = schedule(random.Random(3), 100, 20, 1, 0)
    assert 1800 < len(times) < 2200 and times == sorted(times)
    bursty = schedule(random.Random(3), 100, 20, 5, 0.05)
    assert len(bursty) < len(times)  # pauses take time: fewer in the same window


async def test_short_run_adds_up(sample: str) -> None:
    out = await run(sample, load_profile("agent-explore"), agents=4, rate=50, duration=2, seed=7)
    assert out["sent"] == out["ok"] + out["errors"] == out["scheduled"]
    assert out["errors"] == 0, out["error_kinds"]
    assert out["latency_ms"]["p50"] > 0 and out["latency_ms"]["p99"] >= out["latency_ms"]["p50"]


async def test_latency_counts_from_the_intended_start(sample: str, tmp_path: Path) -> None:
    """A target that takes 50 ms per query, offered 40 queries/s on one connection: each
    query waits behind the previous ones, so latency grows far past 50 ms. A closed-loop
    generator would report ~50 ms and quietly send fewer queries."""
    slow = tmp_path / "slow.toml"
    slow.write_text('name = "slow"\n[[query]]\nsql = "SELECT pg_sleep(0.05)"\nweight = 1\n')
    out = await run(sample, load_profile(str(slow)), agents=1, rate=40, duration=2, seed=1)
    assert out["sent"] == out["scheduled"] and out["errors"] == 0
    assert out["latency_ms"]["p99"] > 500, out["latency_ms"]  # the backlog, measured
    assert out["latency_ms"]["p50"] > 100


def test_compare_direct_and_pgsluice_side_by_side(pg: EmbeddedPostgres, sample: str,
                                                   proxy_factory: ProxyFactory, tmp_path: Path) -> None:
    from cache.feed import INSTALL
    from proxy.embedded import free_port
    pg.psql(INSTALL, db=DB)
    mport = free_port()
    proxy = proxy_factory("--metrics-listen", f"127.0.0.1:{mport}")
    target = tmp_path / "out.json"
    res = subprocess.run([sys.executable, "-m", "loadtest.load", "--target", f"direct={sample}",
                          "--target", f"pgsluice={proxy.dsn(database=DB)}",
                          "--metrics", f"pgsluice=http://127.0.0.1:{mport}/metrics", "--profile",
                          "point-reads", "--agents", "2", "--rate", "50", "--duration", "2", "--warmup", "1",
                          "--json", str(target)],
                         capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parent.parent)
    assert res.returncode == 0, res.stderr
    data = json.loads(target.read_text())
    assert data["profile"] == "point-reads" and set(data["targets"]) == {"direct", "pgsluice"}
    direct, sluice = data["targets"]["direct"], data["targets"]["pgsluice"]
    assert direct["sent"] == sluice["sent"] == direct["scheduled"]  # the same schedule for both
    for out in (direct, sluice):
        assert out["sent"] == out["ok"] + out["errors"] and out["errors"] == 0
    # warmed up on Zipf keys: most answers came from the cache, counted from pgsluice's /metrics
    assert sluice["reached_postgres"] < 0.5 and sluice["pgsluice"]["hits"] > 0
    assert "pgsluice" in res.stdout and "reached PG" in res.stdout
