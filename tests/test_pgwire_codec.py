"""Unit tests of the sans-IO codec in proxy/pgwire: decoders, parsers, encoders, limits.

Every framing decoder is driven three ways: the whole input in one feed, one byte at a
time, and with the start of the next message behind it (which must stay buffered).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.pgwire import codes, encode
from proxy.pgwire.decode import (
    CancelRequest,
    Framer,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    StartupReader,
    decode_startup,
    parse_auth,
    parse_backend_key,
    parse_bind_names,
    parse_error_fields,
    parse_parameter_status,
    parse_parse,
    parse_password,
    parse_sasl_initial,
    parse_target,
    read_cstr,
)
from proxy.pgwire.errors import FEATURE_NOT_SUPPORTED, PROTOCOL_VIOLATION, ProtocolError

_I = struct.Struct("!I")

MODES = ("whole", "bytewise", "trailing")


def untyped(body: bytes) -> bytes:
    """An untyped startup-phase packet around `body`."""
    return _I.pack(len(body) + 4) + body


def gssenc_request() -> bytes:
    return untyped(_I.pack(codes.GSSENC_REQUEST))


# ---- StartupReader + decode_startup -------------------------------------------------------------

def read_startup(packet: bytes, mode: str, trailing: bytes = b"") -> tuple[bytes, StartupReader]:
    """Drive a StartupReader over `packet` in `mode`; returns the body and the reader."""
    reader = StartupReader()
    if mode == "whole":
        reader.feed(packet)
        body = reader.next()
    elif mode == "bytewise":
        body = None
        for i in range(len(packet)):
            assert body is None, "a packet came out before its last byte"
            reader.feed(packet[i:i + 1])
            body = reader.next()
    else:
        reader.feed(packet + trailing)
        body = reader.next()
    assert body is not None
    return body, reader


STARTUP_PARAMS = {"user": "alice", "database": "app", "application_name": "sluice \u00e9t\u00e9",
                  "options": "-c search_path=a,b"}

STARTUP_CASES: list[tuple[str, bytes, object]] = [
    ("startup", encode.startup_message(STARTUP_PARAMS),
     StartupMessage(3, 0, STARTUP_PARAMS)),
    ("startup-3.2", encode.startup_message({"user": "u"}, version=(3 << 16) | 2),
     StartupMessage(3, 2, {"user": "u"})),
    ("startup-no-params", untyped(_I.pack(codes.PROTOCOL_3_0) + b"\x00"),
     StartupMessage(3, 0, {})),
    ("ssl", encode.ssl_request(), SSLRequest()),
    ("gssenc", gssenc_request(), GSSENCRequest()),
    ("cancel", encode.cancel_request(4242, b"\x01\x02\x03\x04"),
     CancelRequest(4242, b"\x01\x02\x03\x04")),
    ("cancel-long-key", encode.cancel_request(7, bytes(range(32))), CancelRequest(7, bytes(range(32)))),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("packet", "expected"), [c[1:] for c in STARTUP_CASES],
                         ids=[c[0] for c in STARTUP_CASES])
def test_startup_packets(packet: bytes, expected: object, mode: str) -> None:
    # What really follows each packet: after SSLRequest/GSSENCRequest another startup packet,
    # after a StartupMessage the client's first typed message (a password, say).
    follow = encode.startup_message({"user": "x"}) if isinstance(expected, SSLRequest | GSSENCRequest) \
        else encode.password(b"secret")
    trailing = follow[:7]
    body, reader = read_startup(packet, mode, trailing)
    assert decode_startup(body) == expected
    if mode == "trailing":
        if isinstance(expected, SSLRequest | GSSENCRequest):
            assert reader.next() is None  # 7 bytes of the next packet: incomplete, kept
            reader.feed(follow[7:])
            nxt = reader.next()
            assert nxt is not None and decode_startup(nxt) == StartupMessage(3, 0, {"user": "x"})
        else:
            assert reader.take_rest() == trailing
    assert reader.take_rest() == b""
    assert reader.next() is None


def test_startup_reader_needs_whole_packet() -> None:
    packet = encode.startup_message({"user": "bob"})
    for cut in (1, 3, 4, 8, len(packet) - 1):
        reader = StartupReader()
        reader.feed(packet[:cut])
        assert reader.next() is None
    reader.feed(packet[-1:])  # the reader holding all but the last byte
    body = reader.next()
    assert body is not None and decode_startup(body) == StartupMessage(3, 0, {"user": "bob"})


def test_two_startup_packets_in_one_feed() -> None:
    reader = StartupReader()
    reader.feed(encode.ssl_request() + gssenc_request() + encode.startup_message({"user": "u"}))
    out = []
    while (body := reader.next()) is not None:
        out.append(decode_startup(body))
    assert out == [SSLRequest(), GSSENCRequest(), StartupMessage(3, 0, {"user": "u"})]


def test_startup_params_keep_order_and_last_duplicate_wins() -> None:
    body = _I.pack(codes.PROTOCOL_3_0) + b"user\x00a\x00database\x00d\x00user\x00b\x00\x00"
    msg = decode_startup(body)
    assert isinstance(msg, StartupMessage)
    assert msg.params == {"user": "b", "database": "d"}


@pytest.mark.parametrize(("body", "sqlstate"), [
    pytest.param(b"", PROTOCOL_VIOLATION, id="empty"),
    pytest.param(b"\x00\x03\x00", PROTOCOL_VIOLATION, id="shorter-than-code"),
    pytest.param(_I.pack(2 << 16), FEATURE_NOT_SUPPORTED, id="version-2.0"),
    pytest.param(_I.pack(4 << 16) + b"user\x00u\x00\x00", FEATURE_NOT_SUPPORTED, id="version-4.0"),
    pytest.param(_I.pack((1234 << 16) | 5677) + b"\x00", FEATURE_NOT_SUPPORTED, id="version-1234.5677"),
    pytest.param(_I.pack(codes.SSL_REQUEST) + b"\x00", FEATURE_NOT_SUPPORTED, id="ssl-with-payload"),
    pytest.param(_I.pack(codes.CANCEL_REQUEST), PROTOCOL_VIOLATION, id="cancel-no-key"),
    pytest.param(_I.pack(codes.CANCEL_REQUEST) + b"\x00\x00\x00\x01\xff\xff\xff",
                 PROTOCOL_VIOLATION, id="cancel-short-key"),
    pytest.param(_I.pack(codes.CANCEL_REQUEST) + b"\x00" * 4 + b"k" * 257,
                 PROTOCOL_VIOLATION, id="cancel-key-too-long"),
    pytest.param(_I.pack(codes.PROTOCOL_3_0), PROTOCOL_VIOLATION, id="no-terminator"),
    pytest.param(_I.pack(codes.PROTOCOL_3_0) + b"user\x00u\x00", PROTOCOL_VIOLATION,
                 id="missing-final-nul"),
    pytest.param(_I.pack(codes.PROTOCOL_3_0) + b"user\x00\x00", PROTOCOL_VIOLATION, id="name-no-value"),
    pytest.param(_I.pack(codes.PROTOCOL_3_0) + b"user\x00u\x00x\x00", PROTOCOL_VIOLATION,
                 id="odd-strings"),
    pytest.param(_I.pack(codes.PROTOCOL_3_0) + b"user\x00\xff\xfe\x00\x00", PROTOCOL_VIOLATION,
                 id="bad-utf8"),
])
def test_decode_startup_rejects(body: bytes, sqlstate: str) -> None:
    with pytest.raises(ProtocolError) as info:
        decode_startup(body)
    assert info.value.sqlstate == sqlstate


# ---- startup limits ------------------------------------------------------------------------------

@pytest.mark.parametrize("length", [codes.MAX_STARTUP_PACKET + 1, 1 << 20, 0xFFFFFFFF])
def test_startup_packet_over_limit_rejected_at_header(length: int) -> None:
    reader = StartupReader()
    with pytest.raises(ProtocolError) as info:
        reader.feed(_I.pack(length))  # the length word alone is enough
    assert info.value.sqlstate == PROTOCOL_VIOLATION


def test_startup_packet_over_limit_rejected_bytewise() -> None:
    header = _I.pack(codes.MAX_STARTUP_PACKET + 1)
    reader = StartupReader()
    for b in header[:3]:
        reader.feed(bytes((b,)))
        assert reader.next() is None
    with pytest.raises(ProtocolError):
        reader.feed(header[3:])


def test_startup_packet_at_limit_accepted() -> None:
    filler = "x" * (codes.MAX_STARTUP_PACKET - 4 - 4 - len("user\x00u\x00application_name\x00\x00\x00"))
    packet = encode.startup_message({"user": "u", "application_name": filler})
    assert len(packet) == codes.MAX_STARTUP_PACKET
    body, _ = read_startup(packet, "whole")
    msg = decode_startup(body)
    assert isinstance(msg, StartupMessage) and msg.params["application_name"] == filler


@pytest.mark.parametrize("length", [0, 1, 4, 7])
def test_startup_length_too_small_rejected(length: int) -> None:
    reader = StartupReader()
    with pytest.raises(ProtocolError):
        reader.feed(_I.pack(length) + b"\x00" * 8)


def test_startup_reader_next_rechecks_length() -> None:
    """next() refuses a bad length even when feed() was bypassed for the head bytes."""
    reader = StartupReader()
    reader.feed(encode.ssl_request() + _I.pack(3) + b"\x00" * 4)
    assert reader.next() is not None
    with pytest.raises(ProtocolError):
        reader.next()


# ---- Framer --------------------------------------------------------------------------------------

def frame_all(data: bytes, mode: str, max_size: int = codes.DEFAULT_MAX_MESSAGE) -> tuple[
        list[tuple[int, bytes]], Framer]:
    framer = Framer(max_size)
    out: list[tuple[int, bytes]] = []
    chunks: Iterator[bytes] = iter([data]) if mode != "bytewise" else (
        data[i:i + 1] for i in range(len(data)))
    for chunk in chunks:
        framer.feed(chunk)
        while (msg := framer.next()) is not None:
            out.append(msg)
    return out, framer


TYPED_CASES: list[tuple[str, bytes, tuple[int, bytes]]] = [
    ("query", encode.query("SELECT 1"), (codes.F_QUERY, b"SELECT 1\x00")),
    ("sync", encode.sync(), (codes.F_SYNC, b"")),
    ("terminate", encode.terminate(), (codes.F_TERMINATE, b"")),
    ("parse", encode.parse(b"s1", b"SELECT $1", b"\x00\x01\x00\x00\x00\x17"),
     (codes.F_PARSE, b"s1\x00SELECT $1\x00\x00\x01\x00\x00\x00\x17")),
    ("close", encode.close_statement(b"s1"), (codes.F_CLOSE, b"Ss1\x00")),
    ("ready", encode.ready_for_query(codes.TXN_BLOCK), (codes.B_READY_FOR_QUERY, b"T")),
    ("error", encode.error_response("08P01", "bad"),
     (codes.B_ERROR_RESPONSE, b"SERROR\x00VERROR\x00C08P01\x00Mbad\x00\x00")),
    ("big-copy-data", encode.message(codes.F_COPY_DATA, bytes(range(256)) * 300),
     (codes.F_COPY_DATA, bytes(range(256)) * 300)),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in TYPED_CASES],
                         ids=[c[0] for c in TYPED_CASES])
def test_framer(data: bytes, expected: tuple[int, bytes], mode: str) -> None:
    trailing = encode.query("SELECT 2")[:6] if mode == "trailing" else b""
    out, framer = frame_all(data + trailing, mode)
    assert out == [expected]
    assert len(framer) == len(trailing)
    if mode == "trailing":
        framer.feed(encode.query("SELECT 2")[6:])
        assert framer.next() == (codes.F_QUERY, b"SELECT 2\x00")
        assert len(framer) == 0


def test_framer_many_messages_in_one_feed() -> None:
    data = b"".join(c[1] for c in TYPED_CASES)
    for mode in ("whole", "bytewise"):
        out, framer = frame_all(data, mode)
        assert out == [c[2] for c in TYPED_CASES]
        assert len(framer) == 0


def test_framer_incomplete_header_and_body() -> None:
    msg = encode.query("SELECT 1")
    for cut in range(len(msg)):
        framer = Framer()
        framer.feed(msg[:cut])
        assert framer.next() is None
        assert len(framer) == cut


@pytest.mark.parametrize("mode", ["whole", "bytewise"])
def test_framer_rejects_oversize_at_header(mode: str) -> None:
    max_size = 1024
    header = b"Q" + _I.pack(max_size + 1)
    framer = Framer(max_size)
    if mode == "bytewise":
        for b in header[:4]:
            framer.feed(bytes((b,)))
            assert framer.next() is None
        framer.feed(header[4:])
    else:
        framer.feed(header)
    with pytest.raises(ProtocolError) as info:
        framer.next()  # no body byte was fed
    assert info.value.sqlstate == PROTOCOL_VIOLATION


def test_framer_accepts_exactly_max_size() -> None:
    max_size = 1024
    msg = encode.message(codes.F_COPY_DATA, b"z" * (max_size - 4))
    framer = Framer(max_size)
    framer.feed(msg)
    assert framer.next() == (codes.F_COPY_DATA, b"z" * (max_size - 4))


def test_framer_oversize_after_a_good_message() -> None:
    framer = Framer(1024)
    framer.feed(encode.sync() + b"Q" + _I.pack(1 << 20))
    assert framer.next() == (codes.F_SYNC, b"")
    with pytest.raises(ProtocolError):
        framer.next()


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_framer_rejects_length_below_4(length: int) -> None:
    framer = Framer()
    framer.feed(b"Q" + _I.pack(length))
    with pytest.raises(ProtocolError) as info:
        framer.next()
    assert info.value.sqlstate == PROTOCOL_VIOLATION


def test_framer_huge_length_word_rejected_with_default_limit() -> None:
    framer = Framer()
    framer.feed(b"d" + _I.pack(0xFFFFFFFF))
    with pytest.raises(ProtocolError):
        framer.next()


# ---- field parsers, through the Framer in all three modes ---------------------------------------

def framed_body(msg: bytes, mode: str) -> bytes:
    """Frame `msg` (a complete typed message) in `mode` and return its body."""
    follow = encode.sync() + encode.query("x")[:3]
    out, framer = frame_all(msg + (follow if mode == "trailing" else b""), mode)
    if mode == "trailing":
        assert out[1:] == [(codes.F_SYNC, b"")]
        assert len(framer) == 3
    assert out[0][0] == msg[0]
    return out[0][1]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "sql", "types"), [
    (b"", b"SELECT 1", b"\x00\x00"),
    (b"stmt", b"SELECT $1::int, $2", b"\x00\x02\x00\x00\x00\x17\x00\x00\x00\x19"),
    (b"\xc3\xa9", "SELECT '\u00e9'".encode(), b"\x00\x00"),
])
def test_parse_parse(name: bytes, sql: bytes, types: bytes, mode: str) -> None:
    body = framed_body(encode.parse(name, sql, types), mode)
    assert parse_parse(body) == (name, sql, types)


@pytest.mark.parametrize("body", [
    pytest.param(b"", id="empty"),
    pytest.param(b"s\x00", id="no-sql"),
    pytest.param(b"s\x00SELECT 1", id="sql-unterminated"),
    pytest.param(b"s\x00SELECT 1\x00", id="no-count"),
    pytest.param(b"s\x00SELECT 1\x00\x00", id="half-count"),
    pytest.param(b"s\x00SELECT 1\x00\x00\x01", id="count-without-oid"),
    pytest.param(b"s\x00SELECT 1\x00\x00\x01\x00\x00\x00", id="short-oid"),
    pytest.param(b"s\x00SELECT 1\x00\x00\x00\xff", id="trailing-byte"),
    pytest.param(b"s\x00SELECT 1\x00\xff\xff", id="count-65535"),
])
def test_parse_parse_rejects(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_parse(body)


def bind_message(portal: bytes, stmt: bytes, rest: bytes) -> bytes:
    return encode.message(codes.F_BIND, portal + b"\x00" + stmt + b"\x00" + rest)


BIND_REST = b"\x00\x00\x00\x01\x00\x00\x00\x01" + b"7" + b"\x00\x00"


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("portal", "stmt"), [(b"", b""), (b"p1", b"s1"), (b"", b"sluice_abc")])
def test_parse_bind_names(portal: bytes, stmt: bytes, mode: str) -> None:
    body = framed_body(bind_message(portal, stmt, BIND_REST), mode)
    got_portal, got_stmt, offset = parse_bind_names(body)
    assert (got_portal, got_stmt) == (portal, stmt)
    assert body[offset:] == BIND_REST


@pytest.mark.parametrize("body", [b"", b"portal", b"portal\x00stmt"])
def test_parse_bind_names_rejects(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_bind_names(body)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("code", "target", "name"), [
    (codes.F_DESCRIBE, b"S", b"s1"), (codes.F_DESCRIBE, b"P", b""),
    (codes.F_CLOSE, b"S", b""), (codes.F_CLOSE, b"P", b"portal"),
])
def test_parse_target(code: int, target: bytes, name: bytes, mode: str) -> None:
    body = framed_body(encode.message(code, target + name + b"\x00"), mode)
    assert parse_target(body) == (target[0], name)


@pytest.mark.parametrize("body", [b"", b"X\x00", b"s\x00", b"S", b"Sname", b"\x00"])
def test_parse_target_rejects(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_target(body)


@pytest.mark.parametrize("mode", MODES)
def test_parse_error_fields(mode: str) -> None:
    msg = encode.error_response("28P01", 'password authentication failed for user "a"',
                                severity="FATAL", detail="d\u00e9tail", hint="h")
    body = framed_body(msg, mode)
    assert parse_error_fields(body) == {
        "S": "FATAL", "V": "FATAL", "C": "28P01",
        "M": 'password authentication failed for user "a"', "D": "d\u00e9tail", "H": "h"}


@pytest.mark.parametrize("mode", MODES)
def test_parse_notice_fields(mode: str) -> None:
    body = framed_body(encode.notice_response("01000", "careful"), mode)
    assert parse_error_fields(body)["C"] == "01000"


def test_parse_error_fields_edge_cases() -> None:
    assert parse_error_fields(b"") == {}
    assert parse_error_fields(b"\x00") == {}
    assert parse_error_fields(b"C42P01\x00\x00ignored") == {"C": "42P01"}
    assert parse_error_fields(b"M\xff\xfe\x00\x00") == {"M": "\ufffd\ufffd"}  # invalid UTF-8 replaced
    with pytest.raises(ProtocolError):
        parse_error_fields(b"Cunterminated")
    with pytest.raises(ProtocolError):
        parse_error_fields(b"C")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("name", "value"), [("TimeZone", "Europe/Paris"), ("application_name", ""),
                                             ("x", "\u00e9\u00e8")])
def test_parse_parameter_status(name: str, value: str, mode: str) -> None:
    body = framed_body(encode.parameter_status(name, value), mode)
    assert parse_parameter_status(body) == (name, value)


@pytest.mark.parametrize("body", [b"", b"name", b"name\x00", b"name\x00value"])
def test_parse_parameter_status_rejects(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        parse_parameter_status(body)


def test_read_cstr() -> None:
    assert read_cstr(b"ab\x00cd\x00", 0) == (b"ab", 3)
    assert read_cstr(b"ab\x00cd\x00", 3) == (b"cd", 6)
    assert read_cstr(b"\x00", 0) == (b"", 1)
    for body, pos in ((b"", 0), (b"abc", 0), (b"ab\x00cd", 3), (b"ab\x00", 3)):
        with pytest.raises(ProtocolError):
            read_cstr(body, pos)


def test_small_parsers() -> None:
    assert parse_backend_key(_I.pack(77) + b"\x00\x00\x00\x09") == (77, b"\x00\x00\x00\x09")
    assert parse_auth(_I.pack(codes.AUTH_MD5) + b"salt") == (codes.AUTH_MD5, b"salt")
    assert parse_password(b"pw\x00") == b"pw"
    assert parse_sasl_initial(b"SCRAM-SHA-256\x00" + struct.pack("!i", -1)) == ("SCRAM-SHA-256", b"")
    for fn, body in ((parse_backend_key, b"\x00" * 7), (parse_auth, b"\x00\x00\x00"),
                     (parse_password, b""), (parse_password, b"pw"),
                     (parse_sasl_initial, b"SCRAM-SHA-256\x00\x00\x00"),
                     (parse_sasl_initial, b"SCRAM-SHA-256\x00" + _I.pack(5) + b"abc"),
                     (parse_sasl_initial, b"SCRAM-SHA-256")):
        with pytest.raises(ProtocolError):
            fn(body)  # type: ignore[operator]


# ---- encoder round trips -------------------------------------------------------------------------

_text = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=40)
_cbytes = st.binary(max_size=40).map(lambda b: b.replace(b"\x00", b"."))


@settings(max_examples=100, deadline=None)
@given(params=st.dictionaries(_text.filter(bool), _text, max_size=6),
       minor=st.integers(0, 0xFFFF), mode=st.sampled_from(MODES))
def test_roundtrip_startup_message(params: dict[str, str], minor: int, mode: str) -> None:
    packet = encode.startup_message(params, version=(3 << 16) | minor)
    if len(packet) > codes.MAX_STARTUP_PACKET:
        return
    body, _ = read_startup(packet, mode, encode.password(b"x"))
    assert decode_startup(body) == StartupMessage(3, minor, params)


@settings(max_examples=100, deadline=None)
@given(pid=st.integers(0, 0xFFFFFFFF), secret=st.binary(min_size=4, max_size=256))
def test_roundtrip_cancel_request(pid: int, secret: bytes) -> None:
    body, _ = read_startup(encode.cancel_request(pid, secret), "whole")
    assert decode_startup(body) == CancelRequest(pid, secret)


@settings(max_examples=100, deadline=None)
@given(name=_cbytes, sql=_cbytes, oids=st.lists(st.integers(0, 0xFFFFFFFF), max_size=5),
       mode=st.sampled_from(MODES))
def test_roundtrip_parse(name: bytes, sql: bytes, oids: list[int], mode: str) -> None:
    types = struct.pack(f"!H{len(oids)}I", len(oids), *oids)
    assert parse_parse(framed_body(encode.parse(name, sql, types), mode)) == (name, sql, types)


@settings(max_examples=100, deadline=None)
@given(fields=st.lists(st.tuples(st.sampled_from("SVCMDHPpqWsctdnFLR"), _text), max_size=8),
       mode=st.sampled_from(MODES))
def test_roundtrip_error_fields(fields: list[tuple[str, str]], mode: str) -> None:
    body = framed_body(encode.message(codes.B_ERROR_RESPONSE, encode.error_fields(fields)), mode)
    assert parse_error_fields(body) == dict(fields)


@settings(max_examples=100, deadline=None)
@given(name=_text, value=_text, mode=st.sampled_from(MODES))
def test_roundtrip_parameter_status(name: str, value: str, mode: str) -> None:
    assert parse_parameter_status(framed_body(encode.parameter_status(name, value), mode)) == (name, value)


@settings(max_examples=100, deadline=None)
@given(code=st.integers(0, 255), body=st.binary(max_size=300), mode=st.sampled_from(MODES))
def test_roundtrip_message(code: int, body: bytes, mode: str) -> None:
    out, framer = frame_all(encode.message(code, body), mode)
    assert out == [(code, body)] and len(framer) == 0


def test_roundtrip_misc_encoders() -> None:
    assert parse_target(framed_body(encode.close_statement(b"s9"), "whole")) == (ord("S"), b"s9")
    assert parse_backend_key(framed_body(encode.backend_key_data(12, 0xDEADBEEF), "whole")) == (
        12, b"\xde\xad\xbe\xef")
    assert parse_auth(framed_body(encode.auth_ok(), "whole")) == (codes.AUTH_OK, b"")
    assert parse_auth(framed_body(encode.auth_request(codes.AUTH_MD5, b"abcd"), "bytewise")) == (
        codes.AUTH_MD5, b"abcd")
    kind, extra = parse_auth(framed_body(encode.auth_sasl(["SCRAM-SHA-256"]), "trailing"))
    assert (kind, extra) == (codes.AUTH_SASL, b"SCRAM-SHA-256\x00\x00")
    assert parse_password(framed_body(encode.password(b"hunter2"), "bytewise")) == b"hunter2"
    assert parse_sasl_initial(framed_body(encode.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=x"),
                                          "trailing")) == ("SCRAM-SHA-256", b"n,,n=,r=x")
    assert framed_body(encode.sasl_response(b"c=biws"), "whole") == b"c=biws"
    assert framed_body(encode.query("SELECT 'x'"), "bytewise") == b"SELECT 'x'\x00"
    assert framed_body(encode.ready_for_query(), "whole") == b"I"
    npv = framed_body(encode.negotiate_protocol_version(0, ["_pq_.a", "_pq_.b"]), "whole")
    assert npv == _I.pack(0) + _I.pack(2) + b"_pq_.a\x00_pq_.b\x00"
    assert encode.PARSE_COMPLETE == b"1\x00\x00\x00\x04"
    assert encode.CLOSE_COMPLETE == b"3\x00\x00\x00\x04"
    assert encode.BIND_COMPLETE == b"2\x00\x00\x00\x04"
    assert encode.ssl_request() == b"\x00\x00\x00\x08\x04\xd2\x16\x2f"
    assert encode.message(ord("Z"), b"I") == b"Z\x00\x00\x00\x05I"
