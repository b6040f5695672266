"""PgBouncer-style auth file: one ``"username" "password"`` pair per line.

Inside quotes a doubled ``""`` is a literal quote; blank lines and lines whose first non-blank
character is ``;`` or ``#`` are comments. A password is plain text, PostgreSQL's md5 form
("md5" + 32 lowercase hex digits) or a SCRAM-SHA-256 secret. Errors name ``source:line``.

>>> creds = parse_userlist('"alice" "s3""cret"\\n; a comment\\n')
>>> creds["alice"].kind, creds["alice"].value
('plain', 's3"cret')
"""

from __future__ import annotations

import codecs
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from proxy.pgwire.scram import ScramSecret, is_md5_hash, parse_scram_secret

__all__ = ["Credential", "UserlistError", "load_userlist", "parse_userlist"]


class UserlistError(ValueError):
    """A malformed auth file; the message starts with ``source:lineno:``."""


@dataclass(frozen=True, slots=True)
class Credential:
    """One user's password as stored in the auth file (value kept out of repr)."""

    kind: Literal["plain", "md5", "scram"]
    value: str = field(repr=False)
    scram: ScramSecret | None = field(default=None, repr=False)


def _credential(password: str) -> Credential:
    if is_md5_hash(password):
        return Credential("md5", password)
    if password.startswith("SCRAM-SHA-256$"):
        return Credential("scram", password, parse_scram_secret(password))
    return Credential("plain", password)


def _quoted(line: str, pos: int, what: str) -> tuple[str, int]:
    """Read the quoted field at or after *pos* (skipping blanks); return (value, end)."""
    while pos < len(line) and line[pos].isspace():
        pos += 1
    if not line.startswith('"', pos):
        raise ValueError(f"expected '\"' starting the {what}")
    parts: list[str] = []
    pos += 1
    while True:
        end = line.find('"', pos)
        if end < 0:
            raise ValueError(f"unterminated quoted {what}")
        parts.append(line[pos:end])
        if not line.startswith('"', end + 1):
            return "".join(parts), end + 1
        parts.append('"')  # a doubled quote stands for one
        pos = end + 2


def _parse_line(line: str) -> tuple[str, Credential]:
    user, pos = _quoted(line, 0, "username")
    password, pos = _quoted(line, pos, "password")
    if line[pos:].strip():
        raise ValueError("unexpected text after the password")
    if not user:
        raise ValueError("empty username")
    if not password:
        raise ValueError(f"empty password for user {user!r}")
    try:
        return user, _credential(password)
    except ValueError as exc:
        raise ValueError(f"bad SCRAM secret for user {user!r}: {exc}") from None


def parse_userlist(text: str, source: str = "<string>") -> dict[str, Credential]:
    """Parse auth-file *text*; raise UserlistError("<source>:<lineno>: ...") on a bad line."""
    users: dict[str, Credential] = {}
    for lineno, raw in enumerate(text.split("\n"), start=1):
        line = raw.removesuffix("\r")
        stripped = line.strip()
        if not stripped or stripped.startswith((";", "#")):
            continue
        try:
            user, credential = _parse_line(line)
        except ValueError as exc:
            raise UserlistError(f"{source}:{lineno}: {exc}") from None
        if user in users:
            raise UserlistError(f"{source}:{lineno}: duplicate entry for user {user!r}")
        users[user] = credential
    return users


def load_userlist(path: str | os.PathLike[str]) -> dict[str, Credential]:
    """Read and parse the auth file at *path* (UTF-8, optional BOM); OSError propagates."""
    source = os.fspath(path)
    data = Path(path).read_bytes().removeprefix(codecs.BOM_UTF8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        lineno = data.count(b"\n", 0, exc.start) + 1
        raise UserlistError(f"{source}:{lineno}: not valid UTF-8") from None
    return parse_userlist(text, source)
