"""Configuration, logs, counters, TLS and the worker channel: what every room reads."""
