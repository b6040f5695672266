"""A network namespace joined to this one by a veth pair: a client in it reaches pgsluice from
a non-loopback address, as a client in another container or on another host does (Docker's
published ports arrive from the bridge, not from 127.0.0.1). Needs root and iproute2
(scripts/test installs it); traffic stays on this machine.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest


@dataclass(frozen=True)
class Namespace:
    name: str
    host_ip: str  # this side of the veth pair: where pgsluice listens
    ns_ip: str  # the client's address, as pgsluice sees it

    def run(self, cmd: Sequence[str], **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run `cmd` inside the namespace (text mode, output captured)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("timeout", 60)
        return subprocess.run(["ip", "netns", "exec", self.name, *cmd], text=True, check=False, **kw)


def _ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


@contextmanager
def namespace() -> Iterator[Namespace]:
    if os.geteuid() != 0:
        pytest.skip("creating a network namespace needs root (CI runs as root)")
    if shutil.which("ip") is None:
        pytest.fail("iproute2's `ip` is missing (scripts/test installs it)")
    tag = secrets.token_hex(3)
    name, host_if, ns_if = f"pgsl-{tag}", f"pgh{tag}", f"pgn{tag}"
    in_use = subprocess.run(["ip", "-o", "addr", "show"], capture_output=True, text=True, check=True).stdout
    net = next(n for n in (16 + secrets.randbelow(200) for _ in range(100))  # another test run's
               if f" 10.213.{n}." not in in_use)  # namespace may be up at the same time
    host_ip, ns_ip = f"10.213.{net}.1", f"10.213.{net}.2"
    _ip("netns", "add", name)
    try:
        _ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
        _ip("link", "set", ns_if, "netns", name)
        _ip("addr", "add", f"{host_ip}/30", "dev", host_if)
        _ip("link", "set", host_if, "up")
        _ip("-n", name, "addr", "add", f"{ns_ip}/30", "dev", ns_if)
        _ip("-n", name, "link", "set", ns_if, "up")
        _ip("-n", name, "link", "set", "lo", "up")
        yield Namespace(name, host_ip, ns_ip)
    finally:
        subprocess.run(["ip", "link", "del", host_if], capture_output=True, check=False)
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
