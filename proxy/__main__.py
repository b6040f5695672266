"""`python -m proxy` is the `pgsluice` command."""

from proxy.ops.cli import main

raise SystemExit(main())
