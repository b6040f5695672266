"""What every side-by-side benchmark prints first and how it stops: the command that reproduces
the run, the machine's cores and its load before anything starts (a busy neighbour skews every
figure, so the reader must see it), and SIGTERM turned into an exit that runs the finally
blocks (the servers a benchmark started are stopped)."""

from __future__ import annotations

import os
import shlex
import signal
import sys


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def start(module: str) -> str:
    """Print the banner; returns the command line (for the JSON record)."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the finally blocks
    command = shlex.join([sys.executable, "-m", module, *sys.argv[1:]])
    print(f"command: {command}\n  cores: {os.cpu_count()}\nloadavg: {loadavg()} (before starting anything)",
          flush=True)  # fmt: skip
    return command
