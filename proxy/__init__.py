"""pgsluice proxy: the wire door, backend pool and CLI."""

__version__ = "0.1.0"
