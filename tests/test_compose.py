"""docker-compose.yml, deploy/prometheus.yml and the Dockerfile, checked without a Docker engine:
every pgsluice command line parses with the CLI's own parser, every PGSLUICE_* variable is a
setting with a valid value, services have health checks, Prometheus scrapes pgsluice's port."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from proxy.cli import build_parser
from proxy.config import FIELD_KINDS, load

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, dict[str, Any]] = COMPOSE["services"]
OURS = {name: svc for name, svc in SERVICES.items() if svc.get("build") == "."}


def _flags(args: list[str]) -> dict[str, Any]:
    parsed = build_parser().parse_args(args)  # SystemExit on an unknown flag or subcommand
    return {name: getattr(parsed, name) for name in FIELD_KINDS if getattr(parsed, name, None) is not None}


@pytest.mark.parametrize("name", sorted(OURS))
def test_pgsluice_services_parse_with_the_cli(name: str) -> None:
    svc = OURS[name]
    env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
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
