"""Lexer-level scan of SQL text for session state, for transaction pooling.

``scan(sql)`` reports what a simple-protocol Query or an extended-protocol Parse
does to *session* state: settings to track and replay (SET/RESET/DISCARD ALL),
whether server-side prepared statements were dropped, and whether the client
must be pinned to its backend (LISTEN, temp tables, session advisory locks, ...).
It lexes like the server (nested comments, E'' strings, dollar quotes, string
continuation) but does not parse: when unsure, it pins.
Function calls hidden behind user-defined functions are out of its reach.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = ["PLAIN", "SessionEffect", "scan", "scan_cached", "split_statements"]

Setting = tuple[str, str | None]


@dataclass(frozen=True, slots=True)
class SessionEffect:
    pin_reason: str | None  # non-None: the client must stay on its backend
    settings: tuple[Setting, ...] = ()  # ("timezone", "'UTC'"), ("timezone", None), ("*", None)
    discards: bool = False  # server-side prepared statements were dropped
    statements: int = 1  # top-level statements, empty ones not counted


PLAIN = SessionEffect(None)

# A token: kind, value, start, end. Kinds: "w" word (value lower-cased), "q" quoted
# identifier (value unquoted), "u" U&"..." identifier (value not decoded: ""),
# "s" string or dollar-quoted literal (value = source text), "n" number or $n, "p" char.
_Tok = tuple[str, str, int, int]
_Piece = tuple[list[_Tok], int, int]  # tokens between top-level ';', source span

_SPACE = " \t\n\r\f\v"
_ID0, _IDN = r"A-Za-z_\x80-\U0010ffff", r"A-Za-z0-9_\x80-\U0010ffff"
_TOKEN = re.compile(
    r"(?P<ws>(?:[ \t\n\r\f\v]++|--[^\n\r]*+)++)|(?P<cm>/\*)"
    f"|(?P<w>[{_ID0}][{_IDN}$]*+)|(?P<dol>\\$(?:[{_ID0}][{_IDN}]*+)?\\$)"
    r"|(?P<n>(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|\$[0-9]+)|(?P<p>.)",
    re.S,
)
_STD_STR = re.compile(r"[^']*+(?:''[^']*+)*+'")  # body after the opening quote
_ESC_STR = re.compile(r"(?:[^'\\]++|''|\\.)*+'", re.S)  # E'...' (backslash escapes)
_QUOTED = re.compile(r'[^"]*+(?:""[^"]*+)*+"')
# 'a'<whitespace with a newline>'b' continues one literal (same lexing mode).
_CONTINUE = re.compile(r"(?:[ \t\f]|--[^\n\r]*+)*+[\n\r](?:[ \t\n\r\f\v]++|--[^\n\r]*+[\n\r])*+'")
_COMMENT_MARK = re.compile(r"/\*|\*/")

# Fast pre-check: lower-cased text containing none of these cannot have a session effect.
# ("reset", "set_config" contain "set"; "pg_temp", "temporary" contain "temp".)
_TRIGGERS = ("set", "discard", "deallocate", "listen", "prepare", "declare", "temp", "load",
             "advisory", "authorization", "role", "u&")
_DO = re.compile(r"do\b")  # literal prefix: fast; the char before is checked by hand
_ADVISORY = frozenset({"pg_advisory_lock", "pg_advisory_lock_shared",
                       "pg_try_advisory_lock", "pg_try_advisory_lock_shared"})
_PG_TEMP = re.compile(r"pg_temp(?:_[0-9]+)?")
_TEMP = ("temp", "temporary")
_ROUTINE = (["function"], ["procedure"])  # CREATE [OR REPLACE] FUNCTION|PROCEDURE
_UNPARSED = "unrecognized SET/RESET"
_AUTH = {"role": "ROLE", "session_authorization": "SESSION AUTHORIZATION"}


def _has_trigger(low: str) -> bool:
    if any(w in low for w in _TRIGGERS):
        return True
    for m in _DO.finditer(low):
        before = low[m.start() - 1 : m.start()]
        if not before or not (before.isalnum() or before in "_$"):
            return True
    return False


def _skip_comment(sql: str, pos: int) -> int:
    depth = 0
    for m in _COMMENT_MARK.finditer(sql, pos + 2):
        if m.group() == "/*":
            depth += 1
        elif depth == 0:
            return m.end()
        else:
            depth -= 1
    return len(sql)


def _string(sql: str, pos: int, backslash: bool) -> int:
    """End of a quoted literal whose body starts at pos (unterminated: end of text)."""
    body = _ESC_STR if backslash else _STD_STR
    while (m := body.match(sql, pos)) is not None:
        pos = m.end()
        if (c := _CONTINUE.match(sql, pos)) is None:
            return pos
        pos = c.end()
    return len(sql)


def _quoted(sql: str, pos: int) -> tuple[int, str]:
    m = _QUOTED.match(sql, pos)
    end = m.end() if m else len(sql)
    return end, sql[pos:end].removesuffix('"').replace('""', '"')


def _lex(sql: str, scs: bool) -> list[_Piece]:
    """Tokens, cut into pieces at top-level ';'. scs: standard_conforming_strings."""
    pieces: list[_Piece] = []
    toks: list[_Tok] = []
    n, pos, seg = len(sql), 0, 0
    while pos < n:
        m = _TOKEN.match(sql, pos)
        assert m is not None  # the last alternative matches any char
        group, start, pos = m.lastgroup, pos, m.end()
        kind, val = "s", ""
        if group == "ws":
            continue
        if group == "cm":
            pos = _skip_comment(sql, start)
            continue
        if group == "w":
            low, after = m.group().lower(), sql[pos : pos + 2]
            if after[:1] == "'" and low in ("e", "b", "x", "n"):  # E'..', B'..', X'..', N'..'
                pos = _string(sql, pos + 1, low == "e" or (low == "n" and not scs))
            elif low == "u" and after == "&'":
                pos = _string(sql, pos + 2, False)
            elif low == "u" and after == '&"':
                kind, pos = "u", _quoted(sql, pos + 2)[0]
            else:
                kind, val = "w", low
        elif group == "n":
            kind = "n"
        elif group == "dol":
            close = sql.find(m.group(), pos)
            pos = n if close < 0 else close + len(m.group())
        elif (c := m.group()) == "'":
            pos = _string(sql, pos, not scs)
        elif c == '"':
            kind = "q"
            pos, val = _quoted(sql, pos)
        elif c == ";":
            pieces.append((toks, seg, start))
            toks, seg = [], pos
            continue
        else:
            kind, val = "p", c
        toks.append((kind, sql[start:pos] if kind == "s" else val, start, pos))
    pieces.append((toks, seg, n))
    return pieces


def _groups(pieces: list[_Piece]) -> list[list[_Piece]]:
    """Join pieces split inside CREATE FUNCTION/PROCEDURE ... BEGIN ATOMIC ... END."""
    groups: list[list[_Piece]] = []
    cur: list[_Piece] = []
    head: list[str] = []
    depth = paren = 0
    opened = False
    for piece in pieces:
        cur.append(piece)
        for kind, val, _, _ in piece[0]:
            if kind == "p" and val in ("(", ")"):
                paren += 1 if val == "(" else -1
                opened = True
            elif kind == "w":
                if len(head) < 4:
                    head.append(val)
                verb = head[3:4] if head[1:3] == ["or", "replace"] else head[1:2]
                if not (opened and paren == 0 and head[0] == "create" and verb in _ROUTINE):
                    continue
                if val == "begin" or (val == "case" and depth > 0):
                    depth += 1
                elif val == "end" and depth > 0:
                    depth -= 1
        if depth == 0:
            groups.append(cur)
            cur, head, paren, opened = [], [], 0, False
    if cur:
        groups.append(cur)
    return groups


def _kw(toks: list[_Tok], i: int) -> str:
    return toks[i][1] if 0 <= i < len(toks) and toks[i][0] == "w" else ""


def _dotted(toks: list[_Tok], i: int) -> tuple[str | None, int]:
    parts: list[str] = []
    while i < len(toks) and toks[i][0] in ("w", "q"):
        parts.append(toks[i][1])
        i += 1
        if not (i < len(toks) and toks[i][:2] == ("p", ".")):
            break
        i += 1
    return (".".join(parts) if parts else None), i


def _value(toks: list[_Tok], sql: str, i: int, reset_words: tuple[str, ...]) -> str | None:
    if len(toks) == i + 1 and _kw(toks, i) in reset_words:
        return None
    return sql[toks[i][2] : toks[-1][3]]


def _set(toks: list[_Tok], sql: str) -> tuple[str | None, list[Setting]]:
    i, k = 1, _kw(toks, 1)
    if k in ("local", "transaction", "constraints"):
        return None, []
    if k == "session":
        i, k = 2, _kw(toks, 2)
        if k == "characteristics":  # session-wide transaction defaults: not replayable here
            return "SET SESSION CHARACTERISTICS", []
        if k == "authorization":
            return "SET SESSION AUTHORIZATION", []
    if k == "role":
        return "SET ROLE", []
    if k == "time" and _kw(toks, i + 1) == "zone" and i + 2 < len(toks):
        if _kw(toks, i + 2) == "interval":  # SET TIME ZONE INTERVAL '+05:30' HOUR TO MINUTE
            return "SET TIME ZONE INTERVAL", []
        return None, [("timezone", _value(toks, sql, i + 2, ("local", "default")))]
    if k == "schema" and i + 1 < len(toks) and toks[i + 1][0] == "s":
        return None, [("search_path", _value(toks, sql, i + 1, ()))]
    if k == "names":
        enc = _value(toks, sql, i + 1, ("default",)) if i + 1 < len(toks) else None
        return None, [("client_encoding", enc)]
    if k == "xml" and _kw(toks, i + 1) == "option" and i + 2 < len(toks):
        return None, [("xmloption", _value(toks, sql, i + 2, ()))]
    name, j = _dotted(toks, i)
    if name is None or j >= len(toks):
        return _UNPARSED, []
    if name.lower() in _AUTH:
        return "SET " + _AUTH[name.lower()], []
    if _kw(toks, j) == "from" and _kw(toks, j + 1) == "current":
        return "SET FROM CURRENT", []
    if not (_kw(toks, j) == "to" or toks[j][:2] == ("p", "=")) or j + 1 >= len(toks):
        return _UNPARSED, []
    # setting names are case-insensitive, quoted or not: SET "TimeZone" is SET timezone
    return None, [(name.lower(), _value(toks, sql, j + 1, ("default",)))]


def _reset(toks: list[_Tok]) -> tuple[str | None, list[Setting]]:
    k = _kw(toks, 1)
    if k == "all" and len(toks) == 2:
        return None, [("*", None)]
    if k == "session" and _kw(toks, 2) == "authorization":
        return "RESET SESSION AUTHORIZATION", []
    if k == "time" and _kw(toks, 2) == "zone" and len(toks) == 3:
        return None, [("timezone", None)]
    if k == "transaction":  # RESET TRANSACTION ISOLATION LEVEL
        return None, []
    name, j = _dotted(toks, 1)
    if name is None or j != len(toks):
        return _UNPARSED, []
    if name.lower() in _AUTH:
        return "RESET " + _AUTH[name.lower()], []
    return None, [(name.lower(), None)]


def _anywhere(toks: list[_Tok]) -> str | None:
    """Pins that may hide anywhere in a statement: calls, pg_temp., CREATE TEMP, INTO TEMP."""
    for i, (kind, val, _, _) in enumerate(toks):
        if kind == "w" and val in ("create", "into"):
            j = i + 1
            if val == "create" and _kw(toks, j) == "or" and _kw(toks, j + 1) == "replace":
                j += 2
            if _kw(toks, j) in ("global", "local"):
                j += 1
            insert = val == "into" and _kw(toks, i - 1) in ("insert", "merge")
            if _kw(toks, j) in _TEMP and not insert:
                return "temporary table"
        nxt = toks[i + 1][1] if i + 1 < len(toks) and toks[i + 1][0] == "p" else ""
        if kind == "u" and (nxt in ("(", ".") or _kw(toks, i + 1) == "uescape"):
            return "U& identifier"  # an escaped name could spell anything: don't decode
        if kind not in ("w", "q") or not nxt:
            continue
        if nxt == "(" and val in _ADVISORY:
            return "session advisory lock"
        if nxt == "(" and val == "set_config":
            if i + 2 < len(toks) and toks[i + 2][:2] == ("s", "'jit'"):
                continue  # asyncpg turns JIT off around type introspection: plans, not results
            return "set_config"
        if nxt == "." and _PG_TEMP.fullmatch(val.lower()):
            return "temporary table"
    return None


def _statement(toks: list[_Tok], sql: str) -> tuple[str | None, list[Setting], bool]:
    head, pin, discards = _kw(toks, 0), None, False
    settings: list[Setting] = []
    if head == "set":
        pin, settings = _set(toks, sql)
    elif head == "reset":
        pin, settings = _reset(toks)
    elif head == "discard":
        discards = _kw(toks, 1) in ("all", "plans")
        if _kw(toks, 1) == "all":
            settings.append(("*", None))
    elif head == "deallocate":
        j = 2 if _kw(toks, 1) == "prepare" and len(toks) > 2 else 1
        discards = _kw(toks, j) == "all" and len(toks) == j + 1
        # DEALLOCATE name removes state: an SQL-level PREPARE already pinned its client, and
        # protocol-level names are mapped by the relay; anything else is Postgres's 26000.
    elif head in ("listen", "load"):
        pin = head.upper()
    elif head == "prepare":  # PREPARE TRANSACTION 'gid' ends the transaction: nothing
        if not (_kw(toks, 1) == "transaction" and len(toks) == 3 and toks[2][0] == "s"):
            pin = "SQL PREPARE"
    elif head == "declare":
        for i in range(1, len(toks)):
            if _kw(toks, i) == "for":
                break
            if _kw(toks, i) == "with" and _kw(toks, i + 1) == "hold":
                pin = "DECLARE WITH HOLD"
                break
    elif head == "do":  # anonymous code block: pin if its body could touch the session
        for t in toks:
            if t[0] == "s" and (_has_trigger(t[1].lower()) or "execute" in t[1].lower()):
                pin = "DO block"
    for name, value in settings:
        if name == "search_path" and value is not None and "pg_temp" in value.lower():
            pin = pin or "pg_temp in search_path"
    return pin or _anywhere(toks), settings, discards


def _count(groups: list[list[_Piece]]) -> int:
    return sum(1 for g in groups if any(piece[0] for piece in g))


def scan(sql: str, *, standard_conforming_strings: bool = True) -> SessionEffect:
    """Session effect of a Query/Parse text. Pass the session's standard_conforming_strings
    (from ParameterStatus): with it off, '...' literals honour backslash escapes."""
    if not _has_trigger(sql.lower()):
        body = sql.strip(_SPACE).removesuffix(";")
        if body and ";" not in body and "--" not in body and "/*" not in body:
            return PLAIN
        count = _count(_groups(_lex(sql, standard_conforming_strings)))
        return PLAIN if count == 1 else SessionEffect(None, statements=count)
    pieces = _lex(sql, standard_conforming_strings)
    pin: str | None = None
    settings: list[Setting] = []
    discards = False
    for toks, _, _ in pieces:
        if toks:
            p, s, d = _statement(toks, sql)
            pin, discards = pin or p, discards or d
            settings.extend(s)
    count = _count(_groups(pieces))
    if pin is None and not settings and not discards and count == 1:
        return PLAIN
    return SessionEffect(pin, tuple(settings), discards, count)


@functools.lru_cache(maxsize=4096)
def scan_cached(sql: str, *, standard_conforming_strings: bool = True) -> SessionEffect:
    """``scan`` behind an LRU cache keyed by the text (and the strings mode)."""
    return scan(sql, standard_conforming_strings=standard_conforming_strings)


def split_statements(sql: str, *, standard_conforming_strings: bool = True) -> list[str]:
    """Top-level statements of ``sql`` (without the ';'), trimmed, empty ones dropped.

    Semicolons inside literals, comments and CREATE FUNCTION ... BEGIN ATOMIC bodies
    do not split. Comments inside or leading a statement are kept in its text."""
    pieces = _lex(sql, standard_conforming_strings)
    return [sql[g[0][1] : g[-1][2]].strip(_SPACE)
            for g in _groups(pieces) if any(piece[0] for piece in g)]
