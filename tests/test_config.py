"""Config layering (flags > PGSLUICE_* env > TOML > defaults), masking, and the CLI's `config`."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from proxy.base.config import Config, load, mask_url, parse_upstream
from proxy.base.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def test_defaults() -> None:
    config = load({}, env={})
    assert config == Config()
    assert config.listen_port == 6543


def test_layers_in_order(tmp_path: Path) -> None:
    toml = tmp_path / "pgsluice.toml"
    toml.write_text('[pgsluice]\npool_max_size = 7\nlisten = "127.0.0.1:7000"\nlog_level = "debug"\n')
    env = {"PGSLUICE_LISTEN": "127.0.0.1:7001", "PGSLUICE_POOL_MAX_SIZE": "8"}
    config = load({"pool_max_size": "9"}, env=env, file=toml)
    assert config.pool_max_size == 9  # flag beats env beats file
    assert config.listen == "127.0.0.1:7001"  # env beats file
    assert config.log_level == "debug"  # file beats default
    assert config.pool_min_size == 0  # default


def test_env_names_the_file(tmp_path: Path) -> None:
    toml = tmp_path / "c.toml"
    toml.write_text("pool_min_size = 2\n")
    assert load({}, env={"PGSLUICE_CONFIG": str(toml)}).pool_min_size == 2


def test_bad_values_name_their_source(tmp_path: Path) -> None:
    toml = tmp_path / "bad.toml"
    toml.write_text('[pgsluice]\nlisten = "127.0.0.1:1"\n\npool_max_size = "lots"\n')
    with pytest.raises(ConfigError, match=r"bad.toml:4: invalid value for pool_max_size"):
        load({}, env={}, file=toml)
    toml.write_text("[pgsluice]\nno_such_thing = 1\n")
    with pytest.raises(ConfigError, match=r"bad.toml:2: unknown setting 'no_such_thing'"):
        load({}, env={}, file=toml)
    with pytest.raises(ConfigError, match="PGSLUICE_AUTH_MODE"):
        load({}, env={"PGSLUICE_AUTH_MODE": "sometimes"})
    with pytest.raises(ConfigError, match="--listen"):
        load({"listen": "nowhere"}, env={})
    with pytest.raises(ConfigError, match="auth_file"):
        load({"auth_mode": "auth_file"}, env={})


def test_upstream_parsing_and_masking() -> None:
    url = parse_upstream("postgresql://u:p%40ss@/db?host=/run/postgresql&port=5433")
    assert (url.host, url.port, url.user, url.password, url.database) == (
        "/run/postgresql", 5433, "u", "p@ss", "db")
    assert mask_url("postgresql://u:secret@h:5432/db") == "postgresql://u:***@h:5432/db"
    assert mask_url("postgresql://u@h/db") == "postgresql://u@h/db"
    with pytest.raises(ConfigError):
        parse_upstream("mysql://x@y/z")


def test_cli_config_masks_secrets() -> None:
    env = {"PATH": "/usr/bin:/bin", "PGSLUICE_POOL_MIN_SIZE": "3"}
    out = subprocess.run(
        [sys.executable, "-m", "proxy", "config", "--json", "--upstream",
         "postgresql://app:hunter2@127.0.0.1:5432/app"],
        capture_output=True, text=True, check=True, cwd=ROOT, env=env, timeout=60)
    shown = json.loads(out.stdout)
    assert "hunter2" not in out.stdout
    assert shown["upstream"] == "postgresql://app:***@127.0.0.1:5432/app"
    assert shown["pool_min_size"] == 3
    toml = subprocess.run([sys.executable, "-m", "proxy", "config"], capture_output=True,
                          text=True, check=True, cwd=ROOT, env=env, timeout=60).stdout
    assert toml.startswith("[pgsluice]\n") and "pool_min_size = 3" in toml


def test_cli_rejects_bad_config() -> None:
    out = subprocess.run([sys.executable, "-m", "proxy", "serve", "--pool-max-size", "0"],
                         capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 2
    assert "pool_max_size must be at least 1" in out.stderr


def test_tls_and_auth_settings(tmp_path: Path) -> None:
    from proxy.ops.certs import Authority
    cert, key = Authority().issue("pgsluice", ["localhost"]).write(tmp_path, "server")
    config = load({"tls_cert": str(cert), "tls_key": str(key), "tls_mode": "require",
                   "server_tls_mode": "verify-full", "auth_user": "auth", "auth_password": "s3cret"}, env={})
    assert (config.tls_mode, config.server_tls_mode) == ("require", "verify-full")
    assert config.masked()["auth_password"] == "***"
    for flags, match in (
        ({"tls_cert": str(cert)}, "tls_cert and tls_key go together"),
        ({"tls_mode": "require"}, "tls_mode = require needs tls_cert"),
        ({"tls_ca": str(cert)}, "tls_ca .* needs tls_cert"),
        ({"metrics_tls": "on"}, "metrics_tls needs tls_cert"),
        ({"tls_mode": "prefer"}, "invalid value for tls_mode"),
        ({"server_tls_mode": "verify"}, "invalid value for server_tls_mode"),
        ({"tls_cert": str(tmp_path / "nope.crt"), "tls_key": str(key)}, r"nope\.crt"),
        ({"tls_cert": str(cert), "tls_key": str(cert)}, "cannot load"),  # a certificate is no key
        ({"server_tls_mode": "verify-ca", "server_tls_ca": str(tmp_path / "ca.pem")}, r"ca\.pem"),
    ):
        with pytest.raises(ConfigError, match=match):
            load(flags, env={})


def test_check_config_names_a_bad_certificate(tmp_path: Path) -> None:
    toml = tmp_path / "tls.toml"
    toml.write_text(f'[pgsluice]\ntls_cert = "{tmp_path}/missing.crt"\ntls_key = "{tmp_path}/missing.key"\n')
    res = subprocess.run([sys.executable, "-m", "proxy", "check-config", str(toml)], cwd=ROOT,
                         capture_output=True, text=True, timeout=60, check=False)
    assert res.returncode == 2 and "missing.crt" in res.stderr, res.stderr
