"""Statements read by their keywords: a Postgres-like tokenizer, small readers over its tokens
(names, name lists, parentheses), and the kind a statement's leading keyword gives it.

The leading keywords are exact and cheap, and never fooled by sqlglot's fallbacks (it parses
`LISTEN ch` as a column alias and much of Postgres's utility syntax as an opaque `Command`), so
a statement's kind always comes from here (KIND_BY_HEAD); sqlglot's tree only adds detail.
No sqlglot here. (planner.normalize has the other scanner: the exact one fast_shape needs.)
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from typing import NamedTuple

from .normalize import ascii_lower
from .plan import Kind

KIND_BY_HEAD = {
    "select": Kind.READ, "values": Kind.READ, "table": Kind.READ, "with": Kind.READ, "show": Kind.READ,
    "explain": Kind.READ,
    "insert": Kind.WRITE, "update": Kind.WRITE, "delete": Kind.WRITE, "merge": Kind.WRITE,
    "truncate": Kind.WRITE, "copy": Kind.WRITE,
    "create": Kind.DDL, "alter": Kind.DDL, "drop": Kind.DDL, "comment": Kind.DDL, "grant": Kind.DDL,
    "revoke": Kind.DDL, "reindex": Kind.DDL, "refresh": Kind.DDL, "security": Kind.DDL,
    "import": Kind.DDL, "reassign": Kind.DDL,
    "begin": Kind.TXN, "start": Kind.TXN, "commit": Kind.TXN, "end": Kind.TXN, "rollback": Kind.TXN,
    "abort": Kind.TXN, "savepoint": Kind.TXN, "release": Kind.TXN,
    "set": Kind.SESSION, "reset": Kind.SESSION, "discard": Kind.SESSION, "listen": Kind.SESSION,
    "unlisten": Kind.SESSION, "prepare": Kind.SESSION, "deallocate": Kind.SESSION,
    "declare": Kind.SESSION, "fetch": Kind.SESSION, "move": Kind.SESSION, "close": Kind.SESSION,
    "vacuum": Kind.UTILITY, "analyze": Kind.UTILITY, "analyse": Kind.UTILITY, "checkpoint": Kind.UTILITY,
    "lock": Kind.UTILITY, "notify": Kind.UTILITY, "do": Kind.UTILITY, "call": Kind.UTILITY,
    "cluster": Kind.UTILITY, "load": Kind.UTILITY,
    "execute": Kind.UNKNOWN,  # runs a prepared statement the text does not show
}  # fmt: skip
# Statements whose whole grammar is keywords, names and literals (no expressions, no function
# calls): the token reader understands them completely.
KEYWORD_GRAMMAR = frozenset({
    "show", "set", "reset", "discard", "listen", "unlisten", "deallocate", "fetch", "move", "close",
    "begin", "start", "commit", "end", "rollback", "abort", "savepoint", "release", "checkpoint",
    "load", "notify", "vacuum", "analyze", "analyse", "lock", "cluster", "reindex", "refresh",
})
QUERY_HEADS = frozenset({"select", "values", "table", "with"})


class Tok(NamedTuple):
    kind: str  # w word (lower-cased), q quoted identifier (unquoted), s string, n number/$n, p punctuation
    value: str
    start: int
    end: int


_TOKEN = re.compile(
    r"""(?P<ws>(?:\s+|--[^\n\r]*)+)
      | (?P<cm>/\*)
      | (?P<dq>\$(?:[A-Za-z_\x80-\U0010ffff][\w\x80-\U0010ffff]*)?\$)
      | (?P<es>[eE]'(?:[^'\\]++|\\.|'')*+'?)
      | (?P<s>(?:[bBxXnN]|[uU]&)?'(?:[^']++|'')*+'?)
      | (?P<q>(?:[uU]&)?"(?:[^"]++|"")*+"?)
      | (?P<n>\$\d+|(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
      | (?P<w>[A-Za-z_\x80-\U0010ffff][\w$\x80-\U0010ffff]*)
      | (?P<p>.)""",
    re.X | re.S,
)


def tokens(sql: str, pos: int = 0) -> Iterator[Tok]:
    """Postgres-like tokens of `sql` from `pos`, comments and whitespace dropped. Never raises;
    an unterminated string, identifier, comment or dollar quote runs to the end."""
    n = len(sql)
    match = _TOKEN.match
    while pos < n:
        m = match(sql, pos)
        if m is None:  # cannot happen: `.` matches anything under re.S
            return
        kind = m.lastgroup
        end = m.end()
        if kind == "ws":
            pass
        elif kind == "cm":
            depth, i = 1, end
            while depth and i < n:
                if sql.startswith("/*", i):
                    depth, i = depth + 1, i + 2
                elif sql.startswith("*/", i):
                    depth, i = depth - 1, i + 2
                else:
                    i += 1
            end = i
        elif kind == "dq":
            close = sql.find(m.group(), end)
            end = n if close < 0 else close + len(m.group())
            yield Tok("s", sql[pos:end], pos, end)
        elif kind == "w":
            yield Tok("w", ascii_lower(m.group()), pos, end)
        elif kind == "q":
            text = m.group()
            body = text[text.index('"') + 1:]
            body = body[:-1] if body.endswith('"') else body
            yield Tok("q", body.replace('""', '"'), pos, end)
        elif kind in ("s", "es"):
            yield Tok("s", m.group(), pos, end)
        elif kind == "n":
            yield Tok("n", m.group(), pos, end)
        else:
            yield Tok("p", m.group(), pos, end)
        pos = end


def head_words(sql: str, n: int = 4) -> list[Tok]:
    """The leading word tokens of a statement, at most `n` (opening parentheses skipped)."""
    out: list[Tok] = []
    for tok in tokens(sql):
        if tok.kind == "w":
            out.append(tok)
            if len(out) >= n:
                break
        elif tok.kind == "p" and tok.value == "(" and not out:
            continue
        else:
            break
    return out


def first_words(sql: str, n: int = 3) -> list[str]:
    """The first `n` keywords of a statement, lower-cased (leading parentheses skipped)."""
    return [tok.value for tok in head_words(sql, n)]


def matching(toks: Sequence[Tok], i: int) -> int:
    """Index just after the parenthesis closing the one at toks[i] (or len(toks))."""
    depth = 0
    for j in range(i, len(toks)):
        tok = toks[j]
        if tok.kind == "p":
            if tok.value == "(":
                depth += 1
            elif tok.value == ")":
                depth -= 1
                if depth == 0:
                    return j + 1
    return len(toks)


def is_word(toks: Sequence[Tok], i: int, *words: str) -> bool:
    return i < len(toks) and toks[i].kind == "w" and (not words or toks[i].value in words)


def is_punct(toks: Sequence[Tok], i: int, char: str) -> bool:
    return i < len(toks) and toks[i].kind == "p" and toks[i].value == char


def read_name(toks: Sequence[Tok], i: int) -> tuple[list[str] | None, int]:
    """A possibly qualified name at toks[i]: its parts and the index after it."""
    if i >= len(toks) or toks[i].kind not in ("w", "q"):
        return None, i
    parts = [toks[i].value]
    i += 1
    while is_punct(toks, i, ".") and i + 1 < len(toks) and toks[i + 1].kind in ("w", "q"):
        parts.append(toks[i + 1].value)
        i += 2
    return parts, i


def read_names(toks: Sequence[Tok], i: int,
               stop: frozenset[str] = frozenset()) -> tuple[list[list[str]], int]:
    """A comma-separated list of names, each optionally preceded by ONLY and followed by `*`
    or a parenthesized column list."""
    out: list[list[str]] = []
    while i < len(toks):
        if is_word(toks, i, "only"):
            i += 1
        if is_word(toks, i) and toks[i].value in stop:
            break
        parts, i = read_name(toks, i)
        if parts is None:
            break
        out.append(parts)
        if is_punct(toks, i, "*"):
            i += 1
        if is_punct(toks, i, "("):
            i = matching(toks, i)
        if not is_punct(toks, i, ","):
            break
        i += 1
    return out, i


def search_path_change(text: str) -> tuple[str, ...] | None:
    """The search_path a SET / RESET statement sets: the names, () for the default, None if
    the statement is about something else."""
    toks = list(tokens(text))
    i = 1
    if is_word(toks, i, "session", "local"):
        i += 1
    if not is_word(toks, i, "search_path"):
        return None
    if toks[0].value == "reset":
        return ()
    i += 1
    if is_word(toks, i, "to") or is_punct(toks, i, "="):
        i += 1
    if is_word(toks, i, "default"):
        return ()
    names: list[str] = []
    for tok in toks[i:]:
        if tok.kind in ("w", "q"):
            names.append(tok.value)
        elif tok.kind == "s" and tok.value.startswith("'"):
            names.append(tok.value[1:-1].replace("''", "'"))
        elif not (tok.kind == "p" and tok.value == ","):
            return None
    return tuple(names) or None
