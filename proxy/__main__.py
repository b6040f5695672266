"""`python -m proxy` is the `pgsluice` command."""

from .cli import main

raise SystemExit(main())
