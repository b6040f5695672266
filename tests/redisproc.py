"""A real redis-server process for tests (Debian's package; scripts/test installs it)."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from proxy.ops.embedded import free_port
from tests.util import port_open, wait_until


class RedisServer:
    """redis-server on 127.0.0.1:<port>, no persistence; kill() and start() again at will."""

    def __init__(self, port: int = 0, password: str = "") -> None:
        self.password = password
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found: scripts/test installs it "
                               "(apt-get install redis-server)")
        self.binary = binary
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="pgsluice-redis-"))
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = self.dir / "redis.log"

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", str(self.dir), "--protected-mode", "no",
                 *(["--requirepass", self.password] if self.password else [])],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_until(lambda: port_open("127.0.0.1", self.port), timeout=10)

    def kill(self) -> None:
        """SIGKILL: everything it held is lost, as in a crash."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None
        deadline = time.monotonic() + 5
        while port_open("127.0.0.1", self.port) and time.monotonic() < deadline:
            time.sleep(0.02)

    def stop(self) -> None:
        self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)
