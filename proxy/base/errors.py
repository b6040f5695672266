"""ConfigError: its own module, so that config.py and tls.py (which config.py calls to load
the files a config names) both import it without importing each other."""


class ConfigError(ValueError):
    """A bad setting; the message names where it came from (flag, env var or file:line)."""
