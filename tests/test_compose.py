"""docker-compose.yml, deploy/prometheus.yml and the Dockerfile, checked without a Docker engine:
every pgsluice command line parses with the CLI's own parser, every PGSLUICE_* variable is a
setting with a valid value, services have health checks, Prometheus scrapes pgsluice's port.
Then the compose file's pgsluice runs as the compose file says (its command, environment and
the certificates its `certs` service makes; the hosts mapped to this machine's), and the psql
commands of its header connect from a network namespace: from a non-loopback address, as from
the host through Docker's published port."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.base.config import FIELD_KINDS, load
from proxy.ops.cli import build_parser, main
from proxy.ops.embedded import EmbeddedPostgres, free_port
from tests.netns import namespace
from tests.redisproc import RedisServer
from tests.util import port_open, wait_until

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OURS = {name: svc for name, svc in SERVICES.items() if svc.get("build") == "."}


def _flags(args: list[str]) -> dict[str, Any]:
    parsed = build_parser().parse_args(args)  # SystemExit on an unknown flag or subcommand
    return {name: getattr(parsed, name) for name in FIELD_KINDS if getattr(parsed, name, None) is not None}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """What the `certs` service writes to its volume, made by its own command here."""
    folder = tmp_path_factory.mktemp("certs")
    command = [arg.replace("/certs", str(folder)) for arg in SERVICES["certs"]["command"]]
    assert main(command) == 0
    mount = next(v for v in SERVICES["pgsluice"]["volumes"] if v.endswith(":/certs:ro"))
    assert f"{mount.split(':')[0]}:/certs" in SERVICES["certs"]["volumes"]  # the same volume
    assert mount.split(":")[0] in COMPOSE["volumes"]
    return folder


@pytest.mark.parametrize("name", sorted(OURS))
def test_pgsluice_services_parse_with_the_cli(name: str, certs: Path) -> None:
    svc = OURS[name]
    env = {k: str(v).replace("/certs", str(certs)) for k, v in (svc.get("environment") or {}).items()}
    for var in env:
        assert var.startswith("PGSLUICE_") and var[9:].lower() in FIELD_KINDS, f"{name}: unknown {var}"
    config = load(_flags(svc["command"]), env=env)  # values validated as at start-up
    if svc["command"][0] == "serve":
        assert config.listen.startswith("0.0.0.0:") and config.metrics_listen.startswith("0.0.0.0:")
        ports = {p.split(":")[-1] for p in svc["ports"]}
        assert {str(config.listen_port), config.metrics_listen.rsplit(":", 1)[1],
                config.grpc_listen.rsplit(":", 1)[1]} <= ports


def test_every_long_running_service_has_a_healthcheck() -> None:
    for name, svc in SERVICES.items():
        if svc.get("restart") == "no":
            continue
        assert "healthcheck" in svc, name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in SERVICES and cond["condition"].startswith("service_"), (name, dep)


def test_prometheus_scrapes_pgsluice() -> None:
    prom = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = [t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    serve = next(svc for svc in OURS.values() if svc["command"][0] == "serve")
    port = load(_flags(serve["command"]), env={}).metrics_listen.rsplit(":", 1)[1]
    service = next(n for n, svc in OURS.items() if svc is serve)
    assert f"{service}:{port}" in targets
    mount = SERVICES["prometheus"]["volumes"][0].split(":")[0]
    assert (ROOT / mount).resolve() == (ROOT / "deploy" / "prometheus.yml").resolve()


def test_dockerfile_runs_serve_as_non_root() -> None:
    text = (ROOT / "Dockerfile").read_text()
    user = re.search(r"^USER (\S+)", text, re.M)
    assert user is not None and user.group(1) not in ("root", "0")
    cmd = re.search(r"^CMD (\[.*\])", text, re.M)
    entry = re.search(r"^ENTRYPOINT (\[.*\])", text, re.M)
    assert cmd is not None and entry is not None and json.loads(entry.group(1)) == ["pgsluice"]
    config = load(_flags(json.loads(cmd.group(1))), env={})
    assert config.listen == "0.0.0.0:6543"
    for folder in ("proxy", "planner", "cache", "protos"):
        assert f"COPY {folder} {folder}" in text


# ---- the compose file's pgsluice, run here ----------------------------------------------------------

HEADER_PSQL = [shlex.split(line.split("#", 1)[1]) for line in
               (ROOT / "docker-compose.yml").read_text().splitlines() if line.startswith("#   psql ")]


def test_compose_quick_start_from_another_host(pg: EmbeddedPostgres, certs: Path, tmp_path: Path) -> None:
    """Postgres 16's image asks network clients for a SCRAM password, as the session `pg` does;
    the header's psql commands, run from another network namespace, must log in."""
    redis = RedisServer()
    redis.start()
    with namespace() as ns:
        wire, metrics, grpc_port = free_port(ns.host_ip), free_port(), free_port()
        mapping = {"postgres:5432": f"127.0.0.1:{pg.port}", "redis:6379": f"127.0.0.1:{redis.port}",
                   "/certs": str(certs), "0.0.0.0:6543": f"{ns.host_ip}:{wire}",
                   "0.0.0.0:9187": f"127.0.0.1:{metrics}", "0.0.0.0:50051": f"127.0.0.1:{grpc_port}",
                   # the header's client side: the published port, and the CA copied out
                   "127.0.0.1:6543": f"{ns.host_ip}:{wire}", "127.0.0.1:9187": f"127.0.0.1:{metrics}",
                   "sslrootcert=ca.crt": f"sslrootcert={certs}/ca.crt",
                   "host=localhost port=6543": f"host=localhost hostaddr={ns.host_ip} port={wire}"}

        def local(value: object) -> str:
            text = str(value)
            for compose, here in mapping.items():
                text = text.replace(compose, here)
            return text

        env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "PGSLUICE_"))}
        env["PYTHONPATH"] = str(ROOT)
        install = [sys.executable, "-m", "proxy", *map(local, SERVICES["change-feed"]["command"])]
        feed = subprocess.run(install, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                              check=False)
        assert feed.returncode == 0, feed.stderr
        svc = SERVICES["pgsluice"]
        env.update({k: local(v) for k, v in svc["environment"].items()})
        log = tmp_path / "pgsluice.log"
        with log.open("wb") as out:
            proc = subprocess.Popen([sys.executable, "-m", "proxy", *map(local, svc["command"])], cwd=ROOT,
                                    env=env, stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: proc.poll() is not None or port_open(ns.host_ip, wire), timeout=20)
            assert proc.poll() is None, log.read_text()
            client = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
            assert len(HEADER_PSQL) >= 3
            for argv in HEADER_PSQL:
                for sslmode in ("prefer", "disable"):  # psql's default, and no TLS: SCRAM either way
                    if sslmode == "disable" and "verify-full" in argv[1]:
                        continue
                    cmd = ["/usr/bin/psql", "-X", "-At", *map(local, argv[1:])]
                    res = ns.run([*cmd, "-c", "\\conninfo"] if "-c" not in cmd else cmd,
                                 env={**client, "PGSSLMODE": sslmode})
                    assert res.returncode == 0, (cmd, res.stdout, res.stderr, log.read_text())
                    if "-c" not in argv:
                        assert ("SSL connection" in res.stdout) == (sslmode != "disable"), res.stdout
            check = [local(a) if a != "python" else sys.executable for a in svc["healthcheck"]["test"][1:]]
            health = subprocess.run(check, capture_output=True, timeout=30, check=False)
            assert health.returncode == 0, health.stderr
            assert f'"peer": "{ns.ns_ip}:' in log.read_text()  # logged in from another address
        finally:
            proc.terminate()
            proc.wait(30)
            redis.stop()
