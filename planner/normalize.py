"""Tokenizer-level normalization: no parse, one regex pass.

`fast_shape` maps texts that differ only in literal values (and whitespace, comments,
keyword case) onto one key, so the plan cache can reuse a Plan made for an earlier
text of the same shape without calling sqlglot. `comment_hints` reads `key=value`
pairs from comments (`/* agent=billing-bot */`, `/* pgsluice: max_staleness=5s */`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<line>--[^\n]*)
  | (?P<block>/\*)
  | (?P<dollar>\$(?P<tag>[A-Za-z_\x80-\uffff][\w\x80-\uffff]*)?\$)
  | (?P<estr>[eE]'(?:[^'\\]|\\.|'')*')
  | (?P<xstr>(?:[bBxX]|[uU]&|[nN])'(?:[^']|'')*')
  | (?P<str>'(?:[^']|'')*')
  | (?P<qid>(?:[uU]&)?"(?:[^"]|"")+")
  | (?P<num>(?:0[xXoObB][0-9a-fA-F_]+|(?:\d[\d_]*(?:\.[\d_]*)?|\.\d[\d_]*)(?:[eE][+-]?\d+)?))
  | (?P<param>\$\d+)
  | (?P<word>[A-Za-z_\x80-\uffff][\w$\x80-\uffff]*)
  | (?P<op>::|[<>=!~+\-*/%^&|#@?]+|[(),;\[\].:])
    """,
    re.VERBOSE,
)
_HINT = re.compile(r"""([A-Za-z_][\w.-]*)\s*=\s*("(?:[^"]|"")*"|'(?:[^']|'')*'|[^\s,;*]+)""")
# Values that make a literal mean "the current time" when cast to a date/time type.
TIME_WORDS = re.compile(r"(?i)\b(now|today|tomorrow|yesterday|allballs)\b")


@dataclass(frozen=True, slots=True)
class FastShape:
    key: str  # tokens with literals as ?s / ?n, keywords and unquoted names lowercased
    literals: tuple[str, ...]  # each literal's exact source text, in order
    starts: tuple[int, ...]  # where each literal starts in the text


def fast_shape(sql: str) -> FastShape | None:
    """The literal-free shape of `sql`, or None when the text is not safe to map by shape
    (unterminated quotes or comments, dollar quoting, unknown characters)."""
    parts: list[str] = []
    literals: list[str] = []
    starts: list[int] = []
    pos, n = 0, len(sql)
    match = _TOKEN.match
    while pos < n:
        m = match(sql, pos)
        if m is None:
            return None
        kind = m.lastgroup
        end = m.end()
        if kind == "word":
            parts.append(m.group().lower())
        elif kind == "ws" or kind == "line":
            pass
        elif kind == "num" or kind == "str":
            if kind == "num" and end < n and (sql[end].isalnum() or sql[end] in "_$"):
                return None  # 1abc: not a plain number
            parts.append("?n" if kind == "num" else "?s")
            literals.append(m.group())
            starts.append(pos)
        elif kind == "block":
            end = _block_end(sql, pos)
            if end < 0:
                return None
        elif kind == "dollar" or kind == "tag":
            return None  # dollar-quoted bodies: leave them to the parser
        else:  # quoted identifiers, E'' / B'' / U&'' strings, params, operators
            parts.append(m.group())
        pos = end
    return FastShape(" ".join(parts), tuple(literals), tuple(starts))


def _block_end(sql: str, pos: int) -> int:
    """End of the (nested) block comment starting at pos, or -1 if unterminated."""
    depth, i, n = 0, pos, len(sql)
    while i < n:
        if sql.startswith("/*", i):
            depth += 1
            i += 2
        elif sql.startswith("*/", i):
            depth -= 1
            i += 2
            if depth == 0:
                return i
        else:
            i += 1
    return -1


def comment_hints(sql: str) -> tuple[tuple[str, str], ...]:
    """`key=value` pairs from the text's comments, in order (a `pgsluice:` prefix is dropped)."""
    if "/*" not in sql and "--" not in sql:
        return ()
    out: list[tuple[str, str]] = []
    pos, n = 0, len(sql)
    while pos < n:
        m = _TOKEN.match(sql, pos)
        if m is None:
            break
        kind = m.lastgroup
        end = m.end()
        if kind == "block":
            end = _block_end(sql, pos)
            if end < 0:
                break
            _hints_in(sql[pos + 2:end - 2], out)
        elif kind == "line":
            _hints_in(sql[pos + 2:end], out)
        elif kind == "dollar" or kind == "tag":
            close = sql.find(m.group(), end)
            if close < 0:
                break
            end = close + len(m.group())
        pos = end
    return tuple(out)


def _hints_in(comment: str, out: list[tuple[str, str]]) -> None:
    text = comment.strip()
    if text.lower().startswith("pgsluice:"):
        text = text[9:]
    for key, value in _HINT.findall(text):
        if value[:1] in "'\"":
            value = value[1:-1].replace(value[0] * 2, value[0])
        out.append((key.lower(), value))
