"""Result cache, single-flight and table versions (lands with issue 4)."""
