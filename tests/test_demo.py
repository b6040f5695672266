"""`pgsluice demo --once` runs end to end on a fresh embedded Postgres and exits 0."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_once(pg_tmp_dir: Path) -> None:
    # pg_tmp_dir, not tmp_path: Postgres runs as another OS user, and pytest keeps its own
    # temp root private (another pytest session may re-restrict it at any moment)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "proxy", "demo", "--once", "--port", "0",
                          "--data-dir", str(pg_tmp_dir / "demo")],
                         capture_output=True, text=True, cwd=ROOT, env=env, timeout=180)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "customer 42" in out.stdout
    assert "2000 point reads from 50 client connections" in out.stdout
    assert "psql postgresql://postgres:pgsluice@127.0.0.1:" in out.stdout
    assert "sslmode=verify-full sslrootcert=" in out.stdout  # its throw-away certificate
    cache = next(line for line in out.stdout.splitlines() if line.startswith("Cache: "))
    assert int(cache.split()[1]) >= 1000, cache  # the second pass of point reads came from cache
    # the side-by-side run: the same schedule against both, no errors, pgsluice's share counted
    rows = {line.split()[0]: line.split() for line in out.stdout.splitlines()
            if line.split()[:1] in (["direct"], ["pgsluice"]) and len(line.split()) == 10}
    assert set(rows) == {"direct", "pgsluice"}, out.stdout
    assert rows["direct"][1] == rows["pgsluice"][1] and rows["direct"][3] == rows["pgsluice"][3] == "0"
    assert rows["direct"][9] == "100.0%" and float(rows["pgsluice"][9].rstrip("%")) < 50
