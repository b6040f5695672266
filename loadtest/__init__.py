"""Load generation and benchmarks."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import NoReturn


def run_script(main: Callable[[], int]) -> NoReturn:
    """A benchmark's `__main__`: exit with main()'s status. The context managers stop what it
    started on Ctrl-C, so that is a line saying so, not a traceback."""
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted; all started processes were stopped", file=sys.stderr)
        sys.exit(130)
