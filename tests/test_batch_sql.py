"""batch_sql without a server: the batch statement's rewrite and the reading of key values."""

from __future__ import annotations

import uuid

import pytest

from proxy.pipeline.batch_sql import _bound, _literal, rewrite


@pytest.mark.parametrize(("sql", "own", "want"), [
    ("SELECT v FROM t WHERE id = 5", 0, 'SELECT v , "id" FROM t WHERE id = ANY($1)'),
    ("select * from t o where o.id = 5;", 0, 'select * , "id" from t o where o.id = ANY($1);'),
    ("SELECT v FROM t WHERE x = $1 AND ID = $2 ORDER BY v", 2,
     'SELECT v , "id" FROM t WHERE x = $1 AND ID = ANY($2) ORDER BY v'),
    ("SELECT extract(year FROM at), v FROM t WHERE (id = 'a''b')", 0,
     'SELECT extract(year FROM at), v , "id" FROM t WHERE (id = ANY($1))'),
    ("SELECT v /* id = 4 */ FROM t WHERE v = 'id = 4' AND id = 4", 0,
     'SELECT v /* id = 4 */ , "id" FROM t WHERE v = \'id = 4\' AND id = ANY($1)'),
])
def test_rewrite(sql: str, own: int, want: str) -> None:
    assert rewrite(sql, "id", own, own or 1) == want


@pytest.mark.parametrize("sql", [
    "SELECT v FROM t WHERE id = -5",  # '=', '-', '5'
    "SELECT v FROM t WHERE id = 5 + 1",
    "SELECT v FROM t WHERE id = 5::int8",
    "SELECT v FROM t WHERE NOT id = 5",
    "SELECT v FROM t WHERE a OR id = 5",
    "SELECT v FROM t WHERE id = 5 AND id = 6",
    "SELECT v FROM t WHERE 5 = id",
    "WITH x AS (SELECT 1) SELECT v FROM t WHERE id = 5",
])
def test_rewrite_refuses_what_it_cannot_place(sql: str) -> None:
    assert rewrite(sql, "id", 0, 1) is None


def test_key_values_read_as_postgres_reads_them() -> None:
    assert _bound(b" +42 ", 0, 0, 23) == (42, "42")
    assert _bound(b"42.0", 0, 0, 23) is None and _bound(b"1_000", 0, 0, 23) is None
    assert _bound(b"2147483648", 0, 0, 23) is None  # out of int4's range: Postgres's error
    assert _bound((7).to_bytes(2, "big"), 1, 21, 23) == (7, "7")  # psycopg's int2 parameter
    assert _bound((7).to_bytes(8, "big"), 1, 20, 23) == (7, "7")
    assert _bound(b"70000", 0, 21, 23) is None  # does not fit the declared int2
    assert _bound(b"7", 0, 1700, 23) is None  # numeric: another comparison
    u = uuid.uuid4()
    assert _bound(str(u).upper().encode(), 0, 0, 2950) == (u, str(u))
    assert _bound(u.bytes, 1, 0, 2950) == (u, str(u))
    assert _bound(b"{" + str(u).encode() + b"}", 0, 0, 2950) is None
    assert _bound('a"b\\é'.encode(), 0, 0, 25) == ('a"b\\é'.encode(), '"a\\"b\\\\é"')
    assert _literal("'it''s'", 25) == (b"it's", '"it\'s"')
    assert _literal("'5'", 23) is None and _literal("5.0", 23) is None and _literal("-5", 20) == (-5, "-5")
