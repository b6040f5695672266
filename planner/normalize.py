"""Tokenizer-level normalization: a hand-written PostgreSQL scanner, no parse.

`fast_shape` maps texts that differ only in literal values (and whitespace, comments, keyword
case) onto one key, so the plan cache can reuse a Plan made for an earlier text of the same
shape without calling sqlglot. `comment_hints` reads `key=value` pairs from comments
(`/* agent=billing-bot */`, `/* pgsluice: max_staleness=5s */`). `literal_sql` is the canonical
SQL text of one literal, shared with planner.canonical.

The scanner follows PostgreSQL 16+ lexing with standard_conforming_strings on: '...' with ''
escapes, E'...' with backslash escapes, U&'...', B'...' / X'...', N'...', $tag$...$tag$,
"quoted identifiers", -- and nested /* */ comments, 1e5 / .5 / 0x1F / 0o17 / 0b101 / 1_000,
$n parameters, and operators (which never swallow a comment start, and shed a trailing + or -
the way PostgreSQL does: `a=-1` is `a = - 1`). Unquoted names fold to lower case in ASCII
only, as PostgreSQL folds them (`É` stays `É`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, replace
from decimal import Decimal

_DEC = r"\d+(?:_\d+)*"
_NUMBER = rf"0[xX](?:_?[0-9a-fA-F])+|0[oO](?:_?[0-7])+|0[bB](?:_?[01])+" \
          rf"|(?:{_DEC}(?:\.(?:{_DEC})?)?|\.{_DEC})(?:[eE][+-]?{_DEC})?"
_TOKEN = re.compile(  # for tokens(): every token, by kind
    rf"""(?P<ws>[ \t\n\r\f\v]+)|(?P<line>--[^\n\r]*)|(?P<block>/\*)|(?P<str>'(?:[^']|'')*')
    |(?P<estr>[eE]'(?:[^'\\]|\\[\s\S]|'')*')|(?P<ustr>[uU]&'(?:[^']|'')*')|(?P<bits>[bBxX]'[^']*')
    |(?P<nstr>[nN]'(?:[^']|'')*')|(?P<qid>(?:[uU]&)?"(?:[^"]|"")+")|(?P<num>{_NUMBER})|(?P<param>\$\d+)
    |(?P<dollar>\$(?:[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_\x80-\U0010ffff]*)?\$)
    |(?P<word>[A-Za-z_\x80-\U0010ffff][A-Za-z0-9_$\x80-\U0010ffff]*)|(?P<punct>::|:=|[(),;\[\].:])
    |(?P<op>(?:[~!@\#^&|`?+*%<>=]|-(?!-)|/(?!\*))+)""",
    re.VERBOSE,
)
# fast_shape lowercases the text (ASCII only, so offsets stay), lexes it with one findall (C
# speed; each token carries the whitespace before it) and classifies tokens by their first
# character. findall skips what it cannot match, so a length check catches unlexable text.
_FAST = re.compile(
    rf"""[ \t\n\r\f\v]*(?:(?:[ac-df-mo-tvwyz_\x80-\U0010ffff]|[ebxn](?!')|u(?!&['"]))
    [a-z0-9_$\x80-\U0010ffff]*
    |::|:=|[(),;\[\]:]|\.(?![0-9])|(?:[~!@\#^&|`?+*%<>=]|-(?!-)|/(?!\*))+|--[^\n\r]*|/\*[\s\S]*?\*/
    |{_NUMBER.lower()}|'(?:[^']|'')*'|e'(?:[^'\\]|\\[\s\S]|'')*'|u&'(?:[^']|'')*'|[bx]'[^']*'|n'(?:[^']|'')*'
    |(?:u&)?"(?:[^"]|"")+"|\$\d+|\$(?:[a-z_\x80-\U0010ffff][a-z0-9_\x80-\U0010ffff]*)?\$)|[ \t\n\r\f\v]+""",
    re.VERBOSE,
)
_WS, _STR, _QID, _NUM, _DOLLAR, _WORD, _PUNCT, _OP = range(8)
_WS_CHARS = " \t\n\r\f\v"
_FIRST = {c: _WS for c in _WS_CHARS} | {c: _NUM for c in "0123456789"} | {c: _PUNCT for c in "(),;[]:."} \
    | {c: _OP for c in "~!@#^&|`?+*%<>=-/"} | {"'": _STR, '"': _QID, "$": _DOLLAR}
# A number in ORDER BY / GROUP BY / DISTINCT ON (...) may be a column ordinal: it stays in the key
# until one of these words (or the clause's closing parenthesis) ends the clause.
_CLAUSE_END = frozenset(("limit", "offset", "fetch", "for", "union", "intersect", "except", "having",
                         "window", "returning", "select", "from", "where", "into"))
_WATCH = _CLAUSE_END | {"by", "uescape"}
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")
_COMMENT_EDGE = re.compile(r"/\*|\*/")
# PostgreSQL's reserved, column-name and type/function-name keywords (a name that is one stays quoted)
KEYWORDS = frozenset("""
all analyse analyze and any array as asc asymmetric authorization between bigint binary bit boolean
both case cast char character check coalesce collate collation column concurrently constraint create
cross current_catalog current_date current_role current_schema current_time current_timestamp
current_user dec decimal default deferrable desc distinct do else end except exists extract false
fetch float for foreign freeze from full grant greatest group grouping having ilike in initially
inner inout int integer intersect interval into is isnull join json json_array json_arrayagg
json_exists json_object json_objectagg json_query json_scalar json_serialize json_table json_value
lateral leading least left like limit localtime localtimestamp merge_action national natural nchar
none normalize not notnull null nullif numeric offset on only or order out outer overlaps overlay
placing position precision primary real references returning right row select session_user setof
similar smallint some substring symmetric system_user table tablesample then time timestamp to
trailing treat trim true union unique user using values varchar variadic verbose when where window
with xmlattributes xmlconcat xmlelement xmlexists xmlforest xmlnamespaces xmlparse xmlpi xmlroot
xmlserialize xmltable""".split())  # noqa: SIM905

# Values that make a literal mean "the current time" when cast to a date/time type.
TIME_WORDS = re.compile(r"(?i)\b(now|today|tomorrow|yesterday|allballs)\b")
# ... and, for rebinding a cached plan to new values, every special date/time/number input.
SPECIAL_WORDS = re.compile(r"(?i)\b(now|today|tomorrow|yesterday|allballs|epoch|infinity|nan)\b")


def ascii_lower(word: str) -> str:
    return word.lower() if word.isascii() else word.translate(_ASCII_LOWER)


@dataclass(frozen=True, slots=True)
class FastShape:
    key: str  # tokens joined by spaces: literals as ?s / ?n, unquoted words lowercased, no comments
    literals: tuple[str, ...]  # each lifted literal's exact source text ('' and E'' strings, numbers)
    starts: tuple[int, ...] = ()  # where each literal starts in the text
    # per statement: its first token (a lowercased word, or "("), the index of its first literal,
    # and where it starts and ends in the text (its `;` excluded)
    statements: tuple[tuple[str, int, int, int], ...] = ()
    max_param: int = 0  # the highest $n the text itself uses
    calls: tuple[tuple[int, int, int], ...] = ()  # `name(...)`: name start and end, end of its `)`
    comments: tuple[tuple[int, int], ...] = ()  # where each comment starts and ends


def fast_shape(sql: str) -> FastShape | None:
    """The literal-free shape of `sql`, or None when the text is not safe to map by shape
    (unterminated quotes or comments, dollar quoting, string continuation, UESCAPE, junk after
    a number, characters PostgreSQL does not lex). About 0.15 us per character."""
    low = sql.lower() if sql.isascii() else sql.translate(_ASCII_LOWER)
    toks = _FAST.findall(low)
    if sum(map(len, toks)) != len(sql):
        return None  # something findall could not lex (an unterminated quote or comment...)
    parts: list[str] = []
    literals: list[str] = []
    starts: list[int] = []
    bounds = [(0, 0, 0)]  # each statement's first part, first literal, offset
    keep: list[int] = []  # paren depths of open ORDER BY / GROUP BY / DISTINCT ON clauses
    opens: list[tuple[int, int]] = []  # per open parenthesis: the name before it, or (-1, -1)
    calls: list[tuple[int, int, int]] = []
    comments: list[tuple[int, int]] = []
    max_param = depth = pos = 0
    number_end = string_at = -1  # where the last number ended; len(parts) after the last string
    name_at = name_end = name_idx = -1  # the last word or quoted name, and its index in parts
    first, append, watch, space = _FIRST.get, parts.append, _WATCH, _WS_CHARS
    WS, STR, QID, NUM, WORD, PUNCT, OP = _WS, _STR, _QID, _NUM, _WORD, _PUNCT, _OP  # locals are fast
    for tok in toks:
        here = pos
        pos += len(tok)
        kind = first(tok[0], WORD)
        if kind == WS:
            tok = tok.lstrip(space)
            if not tok:
                continue
            here = pos - len(tok)
            kind = first(tok[0], WORD)
        if kind == WORD:
            if here == number_end:
                return None  # 1abc: PostgreSQL's "trailing junk"
            if tok[-1] == "'":
                kind = STR  # e'..', b'..', x'..', n'..', u&'..'
            elif tok[-1] == '"':
                kind = QID  # u&".."
            else:
                if tok in watch:
                    if tok == "by":
                        if parts and (parts[-1] == "order" or parts[-1] == "group"):
                            if keep and keep[-1] == depth:
                                keep.pop()  # GROUP BY ... ORDER BY: a clause ends, the next begins
                            keep.append(depth)
                    elif tok == "uescape":
                        return None
                    elif keep and keep[-1] == depth:
                        keep.pop()
                name_at, name_end, name_idx = here, pos, len(parts)
                append(tok)
                continue
        elif kind == PUNCT:
            if tok[0] == "." and len(tok) > 1:
                kind = NUM  # .5
            else:
                if tok == "(":
                    depth += 1
                    if len(parts) > 1 and parts[-1] == "on" and parts[-2] == "distinct":
                        keep.append(depth)
                    opens.append((name_at, name_end) if name_idx == len(parts) - 1 else (-1, -1))
                elif tok == ")":
                    depth -= 1
                    while keep and depth < keep[-1]:
                        keep.pop()
                    if opens and (call := opens.pop())[0] >= 0:
                        calls.append((*call, pos))
                elif tok == ";":
                    keep.clear()
                    depth = 0
                    bounds.append((len(parts) + 1, len(literals), pos))
                append(tok)
                continue
        elif kind == OP:
            if tok[0] in "-/" and tok[:2] in ("--", "/*"):
                if "/*" in tok[2:]:
                    return _without_comments(sql)  # a nested comment: findall cannot see its end
                comments.append((here, pos))
            elif len(tok) > 1 and tok[-1] in "+-":
                trimmed = _trim_operator(tok)
                append(trimmed)
                parts.extend(tok[len(trimmed):])
            else:
                append(tok)
            continue
        if kind == NUM:
            if here == number_end:
                return None  # 1.2.3
            number_end = pos
            if keep:  # maybe an ordinal: ORDER BY 1 is not ORDER BY 2
                append(tok)
            else:
                literals.append(sql[here:pos])
                starts.append(here)
                append("?n")
        elif kind == STR:
            if string_at == len(parts):
                return None  # 'a' 'b': continuation across a newline, or an error
            text = sql[here:pos]
            if tok[0] == "'" or tok[0] == "e":  # B'', X'', N'' and U&'' strings stay in the key
                literals.append(text)
                starts.append(here)
                text = "?s"
            append(text)
            string_at = len(parts)
        elif kind == QID:
            name_at, name_end, name_idx = here, pos, len(parts)
            append(sql[here:pos])
        else:  # $n, or a dollar quote
            if not tok[1:2].isdigit():
                return None  # dollar-quoted bodies (DO, function definitions): left to the parser
            max_param = max(max_param, int(tok[1:]))
            number_end = pos  # $1abc is junk too
            append(tok)
    ends = [start - 1 for _, _, start in bounds[1:]] + [len(sql)]
    statements = tuple((parts[i], lit, start, end) for (i, lit, start), end in zip(bounds, ends, strict=True)
                       if i < len(parts) and parts[i] != ";")
    return FastShape(" ".join(parts), tuple(literals), tuple(starts), statements, max_param, tuple(calls),
                     tuple(comments))


def _without_comments(sql: str) -> FastShape | None:
    """fast_shape of the text with its comments blanked out (offsets kept)."""
    out = list(sql)
    comments = []
    try:
        for kind, start, end in tokens(sql):
            if kind == "line" or kind == "block":
                out[start:end] = " " * (end - start)
                comments.append((start, end))
    except ValueError:
        return None
    shape = fast_shape("".join(out))
    return None if shape is None else replace(shape, comments=tuple(comments))


def _trim_operator(op: str) -> str:
    """A multi-character operator cannot end in + or - unless it also holds one of ~ ! @ # % ^
    & | ` ? (so `=-` is `=` then `-`)."""
    if any(c in "~!@#%^&|`?" for c in op):
        return op
    while len(op) > 1 and op[-1] in "+-":
        op = op[:-1]
    return op


def tokens(sql: str) -> Iterator[tuple[str, int, int]]:
    """Every token of `sql` as (kind, start, end), whitespace and comments too; dollar-quoted
    strings and nested comments whole. Raises ValueError on text PostgreSQL would not lex."""
    pos, n = 0, len(sql)
    while pos < n:
        m = _TOKEN.match(sql, pos)
        if m is None:
            raise ValueError(f"cannot lex at offset {pos}")
        kind, end = m.lastgroup or "", m.end()
        if kind == "block":  # nested: /* a /* b */ c */
            depth, end = 0, pos
            while (edge := _COMMENT_EDGE.search(sql, end)) is not None:
                end = edge.end()
                depth += 1 if edge.group() == "/*" else -1
                if depth == 0:
                    break
            else:
                end = -1
        elif kind == "dollar":
            close = sql.find(m.group(), end)
            end = close + len(m.group()) if close >= 0 else -1
        elif kind == "op" and end - pos > 1 and sql[end - 1] in "+-":
            end = pos + len(_trim_operator(m.group()))
        if end < 0:
            raise ValueError(f"unterminated {kind} at offset {pos}")
        yield kind, pos, end
        pos = end


def statement_spans(sql: str) -> list[tuple[int, int]]:
    """(start, end) of each non-empty statement of the text (split at `;` tokens)."""
    out, start, empty = [], 0, True
    for kind, s, e in tokens(sql):
        if kind == "punct" and sql[s:e] == ";":
            if not empty:
                out.append((start, s))
            start, empty = e, True
        elif kind not in ("ws", "line", "block"):
            empty = False
    return [*out, (start, len(sql))] if not empty else out


def normalize_tokens(sql: str) -> str:
    """Tokens joined by single spaces: comments dropped, unquoted words lowercased, numbers and
    '' / E'' strings in canonical form (literal_sql), the rest as written. Raises ValueError
    like tokens()."""
    out = []
    for kind, start, end in tokens(sql):
        if kind == "word":
            out.append(ascii_lower(sql[start:end]))
        elif kind == "str" or kind == "estr" or kind == "num":
            out.append(literal_sql(sql[start:end]) or sql[start:end])
        elif kind != "ws" and kind != "line" and kind != "block":
            out.append(sql[start:end])
    return " ".join(out)


# ---- literals ----------------------------------------------------------------------------------

_E_ESCAPE = re.compile(r"''|\\(?:([0-7]{1,3})|x([0-9a-fA-F]{1,2})|u([0-9a-fA-F]{4})|U([0-9a-fA-F]{8})"
                       r"|([\s\S]))")
_SIMPLE_ESCAPES = {"b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "'": "'"}


def literal_sql(text: str) -> str | None:
    """The canonical SQL text of a '' string, E'' string or number token: numbers in decimal
    without underscores or redundant zeros (`0x1F` -> `31`, `1_000` -> `1000`, `.5` -> `0.5`,
    `1E+05` -> `1e5`; `1.50` keeps its scale, `1.` its type), strings in standard form
    (`E'it\\'s'` -> `'it''s'`). None when it cannot be decoded here (an invalid escape, a NUL,
    a raw byte)."""
    first = text[:1]
    if first == "'":
        return text
    if first == "e" or first == "E":
        try:
            value = _E_ESCAPE.sub(_e_char, text[2:-1])
            value.encode("utf-8")  # no lone surrogates
        except (ValueError, UnicodeError):
            return None
        return None if "\x00" in value else "'" + value.replace("'", "''") + "'"
    text = text.replace("_", "")
    if text[:2].lower() in ("0x", "0o", "0b"):
        return str(int(text[2:], {"x": 16, "o": 8, "b": 2}[text[1].lower()]))
    if not text or not (text[0].isdigit() or text[0] == "."):
        return None
    mantissa, _, exponent = text.lower().partition("e")
    whole, dot, frac = mantissa.partition(".")
    out = (whole.lstrip("0") or "0") + dot + frac
    if exponent:
        out += "e" + ("-" if exponent[0] == "-" else "") + (exponent.lstrip("+-").lstrip("0") or "0")
    return out


def _e_char(m: re.Match[str]) -> str:
    octal, hex2, u4, u8, other = m.groups()
    if octal or hex2:
        code = int(octal, 8) if octal else int(hex2, 16)
        if code >= 0x80:  # a raw byte, valid only inside a multibyte sequence: not decoded here
            raise ValueError("raw byte escape")
        return chr(code)
    if u4 or u8:
        return chr(int(u4 or u8, 16))
    if other is None:
        return "'"  # ''
    if other in "uU":
        raise ValueError("incomplete Unicode escape")  # an error in PostgreSQL
    return _SIMPLE_ESCAPES.get(other, other)


def sorted_values(values: list[str]) -> list[str]:
    """Canonical literals of an IN list in a fixed order when they are all of one kind
    (integers, decimals or strings); anything else (NULL, booleans, a mix) keeps its order."""
    kinds = {"s" if v[0] == "'" else "i" if v.lstrip("-").isdigit() else "d" if v[0] in "-.0123456789"
             else "?" for v in values}
    if len(kinds) != 1 or "?" in kinds:
        return values
    kind = kinds.pop()
    if kind == "s":
        return sorted(values)
    return sorted(values, key=lambda v: (int(v) if kind == "i" else Decimal(v), v))


# ---- comment hints -------------------------------------------------------------------------------

# A key starts where a word starts, and neither a key nor a quoted value is ever scanned twice:
# without that, a long comment without `=` took quadratic time (16 KB: 7.7 s, in the event loop).
_HINT = re.compile(r"""(?<![\w.-])([A-Za-z_][\w.-]*+)\s*+=\s*+"""
                   r"""("(?:[^"]|"")*+"|'(?:[^']|'')*+'|[^\s,;'"]++)""")


def comment_hints(sql: str) -> tuple[tuple[str, str], ...]:
    """`key=value` pairs from the text's comments, in order: keys lowercased, quoted values
    unquoted, a leading `pgsluice:` dropped. Comment-like text inside strings does not count."""
    if "/*" not in sql and "--" not in sql:
        return ()
    out: list[tuple[str, str]] = []
    try:
        for kind, start, end in tokens(sql):
            if kind == "block" or kind == "line":
                text = sql[start + 2:end - 2 if kind == "block" else end].strip()
                if text[:9].lower() == "pgsluice:":
                    text = text[9:]
                for key, value in _HINT.findall(text):
                    if value[:1] in "'\"":
                        value = value[1:-1].replace(value[0] * 2, value[0])
                    out.append((key.lower(), value))
    except ValueError:
        pass  # hints before the part that cannot be lexed still count
    return tuple(out)
