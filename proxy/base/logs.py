"""Structured logs: text, JSON lines or logfmt (config `log_format`), one line per event.

Events carry fields (`log.info("client connected", extra=fields(peer=..., user=...))`); the
JSON and logfmt formatters emit them as keys, the text formatter appends them as k=v. By
default there is one line per connection event and per rejected or failed query, never one
per successful query; requests slower than `slow_query_ms` get a line of their own.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_FIELDS = "pgsluice_fields"


def fields(**kw: Any) -> dict[str, Any]:
    """`extra=` for a log call: structured fields of the event."""
    return {_FIELDS: kw}


def peer_text(peer: object) -> str:
    """A client address as host:port."""
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer or "")


def _event(record: logging.LogRecord) -> dict[str, Any]:
    out: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
        "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage(),
    }
    out.update(getattr(record, _FIELDS, {}))
    if record.exc_info:
        out["exc"] = logging.Formatter().formatException(record.exc_info)
    return out


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_event(record), default=str, ensure_ascii=False)


def _logfmt_value(value: Any) -> str:
    text = "" if value is None else str(value)
    if text and all(c.isalnum() or c in "-_./:@" for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _event(record).items())


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        extra = getattr(record, _FIELDS, None)
        if extra:
            line += " " + " ".join(f"{k}={_logfmt_value(v)}" for k, v in extra.items())
        return line


def setup(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter() if fmt == "logfmt"
                         else TextFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
