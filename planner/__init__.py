"""Query planner: normalize, fingerprint, classify and guard SQL (lands with issue 3)."""
