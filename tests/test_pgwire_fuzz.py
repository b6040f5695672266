"""Fuzzing the codec: on any input, every decoder and parser returns or raises ProtocolError.

Anything else escaping (IndexError, struct.error, UnicodeDecodeError, ValueError, ...)
would reach the event loop as an unhandled exception instead of an ErrorResponse.
Inputs are arbitrary bytes and valid messages mutated (flipped bytes, truncation, lying
length words, spliced garbage). The SCRAM server, which parses client bytes during
login, has the same contract with ScramError.
"""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Callable

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from proxy.pgwire import codes, encode
from proxy.pgwire.decode import (
    Framer,
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
from proxy.pgwire.errors import ProtocolError
from proxy.pgwire.scram import ScramError, ScramServer, make_scram_secret
from proxy.pipeline import relay

_I = struct.Struct("!I")
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

BodyParser = Callable[[bytes], object]
BODY_PARSERS: dict[str, BodyParser] = {
    "decode_startup": decode_startup,
    "parse_parse": parse_parse,
    "parse_bind_names": parse_bind_names,
    "parse_target": parse_target,
    "parse_error_fields": parse_error_fields,
    "parse_parameter_status": parse_parameter_status,
    "parse_backend_key": parse_backend_key,
    "parse_auth": parse_auth,
    "parse_sasl_initial": parse_sasl_initial,
    "parse_password": parse_password,
}


def only_protocol_errors(fn: Callable[[], object]) -> None:
    try:
        fn()
    except ProtocolError as exc:
        assert isinstance(exc.sqlstate, str) and len(exc.sqlstate) == 5
        assert isinstance(exc.message, str) and exc.message


def drain_startup(reader: StartupReader, chunks: list[bytes]) -> None:
    """Feed chunks, decoding every complete packet, until a ProtocolError (or the end)."""
    for chunk in chunks:
        reader.feed(chunk)
        while (body := reader.next()) is not None:
            assert len(body) + 4 <= codes.MAX_STARTUP_PACKET
            decode_startup(body)
    reader.take_rest()


def drain_framer(framer: Framer, chunks: list[bytes], parse: BodyParser | None = None) -> None:
    held = 0
    for chunk in chunks:
        framer.feed(chunk)
        held += len(chunk)
        while (msg := framer.next()) is not None:
            code, body = msg
            assert 0 <= code <= 255 and len(body) + 4 <= framer.max_size
            held -= len(body) + 5
            if parse is not None:
                parse(body)
        assert len(framer) == held


def split(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts} | {0, len(data)})
    return [data[a:b] for a, b in itertools.pairwise(points)] or [b""]


# ---- arbitrary bytes -------------------------------------------------------------------------

@FUZZ
@given(name=st.sampled_from(sorted(BODY_PARSERS)), body=st.binary(max_size=300))
@example(name="decode_startup", body=_I.pack(codes.CANCEL_REQUEST) + b"\x00\x00")
@example(name="decode_startup", body=_I.pack(codes.PROTOCOL_3_0) + b"\xff\x00\x00\x00")
@example(name="parse_parse", body=b"\x00\x00\xff")
@example(name="parse_sasl_initial", body=b"\x00\xff\xff\xff\xff")
def test_body_parsers_on_arbitrary_bytes(name: str, body: bytes) -> None:
    only_protocol_errors(lambda: BODY_PARSERS[name](body))


@FUZZ
@given(body=st.binary(max_size=64), pos=st.integers(0, 70))
def test_read_cstr_on_arbitrary_bytes(body: bytes, pos: int) -> None:
    only_protocol_errors(lambda: read_cstr(body, pos))


@FUZZ
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=8))
def test_startup_reader_on_arbitrary_bytes(data: bytes, cuts: list[int]) -> None:
    only_protocol_errors(lambda: drain_startup(StartupReader(), split(data, cuts)))


@FUZZ
@given(code=st.sampled_from([codes.PROTOCOL_3_0, codes.SSL_REQUEST, codes.GSSENC_REQUEST,
                             codes.CANCEL_REQUEST, (3 << 16) | 1, 2 << 16]),
       payload=st.binary(max_size=120), length_delta=st.integers(-12, 12),
       cuts=st.lists(st.integers(0, 200), max_size=6))
def test_startup_reader_plausible_headers(code: int, payload: bytes, length_delta: int,
                                          cuts: list[int]) -> None:
    body = _I.pack(code) + payload
    length = max(0, len(body) + 4 + length_delta)
    data = _I.pack(length) + body
    only_protocol_errors(lambda: drain_startup(StartupReader(), split(data, cuts)))


@FUZZ
@given(data=st.binary(max_size=400), cuts=st.lists(st.integers(0, 400), max_size=8),
       max_size=st.integers(4, 300), parser=st.sampled_from([None, *sorted(BODY_PARSERS)]))
def test_framer_on_arbitrary_bytes(data: bytes, cuts: list[int], max_size: int,
                                   parser: str | None) -> None:
    parse = BODY_PARSERS[parser] if parser else None
    only_protocol_errors(lambda: drain_framer(Framer(max_size), split(data, cuts), parse))


@FUZZ
@given(data=st.binary(max_size=64))
def test_relay_has_message_on_arbitrary_bytes(data: bytes) -> None:
    only_protocol_errors(lambda: relay.has_message(bytearray(data)))


# ---- mutated valid messages ------------------------------------------------------------------

_cbytes = st.binary(max_size=24).map(lambda b: b.replace(b"\x00", b"."))
_ctext = st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",)), max_size=16)


@st.composite
def valid_typed(draw: st.DrawFn) -> tuple[bytes, str]:
    """A valid typed message and the parser for its body."""
    kind = draw(st.sampled_from(["parse", "bind", "describe", "close", "error", "status", "key",
                                 "auth", "sasl", "password"]))
    name, sql = draw(_cbytes), draw(_cbytes)
    if kind == "parse":
        oids = draw(st.lists(st.integers(0, 0xFFFFFFFF), max_size=3))
        return encode.parse(name, sql, struct.pack(f"!H{len(oids)}I", len(oids), *oids)), "parse_parse"
    if kind == "bind":
        return (encode.message(codes.F_BIND, name + b"\x00" + sql + b"\x00" + draw(st.binary(max_size=20))),
                "parse_bind_names")
    if kind in ("describe", "close"):
        target = draw(st.sampled_from([b"S", b"P"]))
        code = codes.F_DESCRIBE if kind == "describe" else codes.F_CLOSE
        return encode.message(code, target + name + b"\x00"), "parse_target"
    if kind == "error":
        fields = draw(st.lists(st.tuples(st.sampled_from("SVCMDH"), _ctext), max_size=5))
        return encode.message(codes.B_ERROR_RESPONSE, encode.error_fields(fields)), "parse_error_fields"
    if kind == "status":
        return encode.parameter_status(draw(_ctext), draw(_ctext)), "parse_parameter_status"
    if kind == "key":
        return encode.backend_key_data(draw(st.integers(0, 0xFFFFFFFF)),
                                       draw(st.integers(0, 0xFFFFFFFF))), "parse_backend_key"
    if kind == "auth":
        return encode.auth_request(draw(st.integers(0, 12)), draw(st.binary(max_size=8))), "parse_auth"
    if kind == "sasl":
        return encode.sasl_initial_response(draw(_ctext), draw(st.binary(max_size=20))), "parse_sasl_initial"
    return encode.password(name), "parse_password"


@st.composite
def valid_startup(draw: st.DrawFn) -> bytes:
    kind = draw(st.sampled_from(["startup", "ssl", "gss", "cancel"]))
    if kind == "startup":
        params = draw(st.dictionaries(_ctext.filter(bool), _ctext, max_size=4))
        return encode.startup_message(params, version=draw(st.sampled_from([codes.PROTOCOL_3_0,
                                                                           (3 << 16) | 2])))
    if kind == "ssl":
        return encode.ssl_request()
    if kind == "gss":
        return _I.pack(8) + _I.pack(codes.GSSENC_REQUEST)
    return encode.cancel_request(draw(st.integers(0, 0xFFFFFFFF)), draw(st.binary(min_size=4, max_size=8)))


@st.composite
def mutated(draw: st.DrawFn, data: bytes, length_at: int) -> bytes:
    """`data` with one or more of: flipped bytes, truncation, a lying length word, garbage."""
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["flip", "truncate", "lie", "insert", "delete", "append"]))
        if op == "flip" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            buf[i] ^= draw(st.integers(1, 255))
        elif op == "truncate":  # often just the last few bytes: a short tail field
            del buf[draw(st.one_of(st.integers(0, len(buf)), st.integers(max(0, len(buf) - 6), len(buf)))):]
        elif op == "lie" and len(buf) >= length_at + 4:
            real = _I.unpack_from(buf, length_at)[0]
            lie = draw(st.one_of(st.integers(0, 8), st.integers(max(0, real - 6), real + 6),
                                 st.sampled_from([0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 10_001])))
            _I.pack_into(buf, length_at, lie % (1 << 32))
        elif op == "insert":
            i = draw(st.integers(0, len(buf)))
            buf[i:i] = draw(st.binary(min_size=1, max_size=6))
        elif op == "delete" and buf:
            i = draw(st.integers(0, len(buf) - 1))
            del buf[i:i + draw(st.integers(1, 4))]
        elif op == "append":
            buf += draw(st.binary(min_size=1, max_size=10))
    return bytes(buf)


@FUZZ
@given(data=st.data(), msg_parser=valid_typed(), cuts=st.lists(st.integers(0, 120), max_size=6),
       max_size=st.sampled_from([16, 64, codes.DEFAULT_MAX_MESSAGE]))
def test_framer_and_parsers_on_mutated_messages(data: st.DataObject, msg_parser: tuple[bytes, str],
                                                cuts: list[int], max_size: int) -> None:
    msg, parser = msg_parser
    bad = data.draw(mutated(msg, length_at=1))
    body_parser = BODY_PARSERS[parser]
    only_protocol_errors(lambda: drain_framer(Framer(max_size), split(bad, cuts), body_parser))
    only_protocol_errors(lambda: body_parser(bad[5:]))


@FUZZ
@given(data=st.data(), packet=valid_startup(), cuts=st.lists(st.integers(0, 120), max_size=6))
def test_startup_on_mutated_packets(data: st.DataObject, packet: bytes, cuts: list[int]) -> None:
    bad = data.draw(mutated(packet, length_at=0))
    only_protocol_errors(lambda: drain_startup(StartupReader(), split(bad, cuts)))
    only_protocol_errors(lambda: decode_startup(bad[4:]))


@FUZZ
@given(data=st.data(), packets=st.lists(valid_startup(), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 300), max_size=6))
def test_startup_reader_on_mutated_streams(data: st.DataObject, packets: list[bytes],
                                           cuts: list[int]) -> None:
    stream = b"".join(packets)
    bad = data.draw(mutated(stream, length_at=0))
    only_protocol_errors(lambda: drain_startup(StartupReader(), split(bad, cuts)))


@FUZZ
@given(data=st.data(), msgs=st.lists(valid_typed(), min_size=1, max_size=4),
       cuts=st.lists(st.integers(0, 400), max_size=8))
def test_framer_on_mutated_streams(data: st.DataObject, msgs: list[tuple[bytes, str]],
                                   cuts: list[int]) -> None:
    stream = b"".join(m for m, _ in msgs)
    i = data.draw(st.integers(0, len(msgs) - 1))
    at = sum(len(m) for m, _ in msgs[:i]) + 1  # lie in the length word of message i
    bad = data.draw(mutated(stream, length_at=at))
    only_protocol_errors(lambda: drain_framer(Framer(), split(bad, cuts)))
    only_protocol_errors(lambda: relay.has_message(bytearray(bad)))


# ---- the SCRAM server parses client bytes during login ---------------------------------------

_SECRET = make_scram_secret("pencil", salt=b"NaCl", iterations=16)


def only_scram_errors(fn: Callable[[], object]) -> None:
    with contextlib.suppress(ScramError):
        fn()


_scram_first = st.one_of(
    st.binary(max_size=80),
    st.builds(lambda gs2, attrs: (gs2 + attrs).encode("utf-8", "surrogatepass"),
              st.sampled_from(["n,,", "y,,", "p=x,,", "n,a=x,", "n", ",,", ""]),
              st.text(st.sampled_from("nr=,m!~a\u00e9\x00"), max_size=30)),
)


@FUZZ
@given(first=_scram_first, final=st.binary(max_size=120), valid_first=st.booleans())
def test_scram_server_on_arbitrary_bytes(first: bytes, final: bytes, valid_first: bool) -> None:
    server = ScramServer(_SECRET, nonce="srv")
    if valid_first:
        server.server_first(b"n,,n=,r=cli")
    else:
        only_scram_errors(lambda: server.server_first(first))
    only_scram_errors(lambda: server.server_final(final))


@FUZZ
@given(head=st.text(st.sampled_from("cr=,pbiwsn\u00e9+/"), max_size=40),
       proof=st.text(st.sampled_from("AZaz09+/=\u00e9 "), max_size=50))
def test_scram_server_final_plausible(head: str, proof: str) -> None:
    server = ScramServer(_SECRET, nonce="srv")
    server.server_first(b"n,,n=,r=cli")
    only_scram_errors(lambda: server.server_final(f"{head},p={proof}".encode()))


# ---- exhaustive small mutations of fixed samples ---------------------------------------------

SAMPLES: list[tuple[bytes, str]] = [
    (encode.parse(b"s1", b"SELECT $1", b"\x00\x01\x00\x00\x00\x17"), "parse_parse"),
    (encode.parse(b"", b"SELECT 1"), "parse_parse"),
    (encode.message(codes.F_BIND, b"p\x00s1\x00\x00\x00\x00\x01\x00\x00\x00\x017\x00\x00"),
     "parse_bind_names"),
    (encode.message(codes.F_DESCRIBE, b"Ss1\x00"), "parse_target"),
    (encode.close_statement(b"sluice_x"), "parse_target"),
    (encode.error_response("08P01", "bad", detail="d"), "parse_error_fields"),
    (encode.parameter_status("TimeZone", "UTC"), "parse_parameter_status"),
    (encode.backend_key_data(1, 2), "parse_backend_key"),
    (encode.auth_request(codes.AUTH_MD5, b"salt"), "parse_auth"),
    (encode.sasl_initial_response("SCRAM-SHA-256", b"n,,n=,r=abc"), "parse_sasl_initial"),
    (encode.password(b"pw"), "parse_password"),
]
STARTUP_SAMPLES = [encode.startup_message({"user": "u", "database": "d"}), encode.ssl_request(),
                   _I.pack(8) + _I.pack(codes.GSSENC_REQUEST), encode.cancel_request(5, b"abcd")]


def test_every_truncation_and_byte_flip_of_samples() -> None:
    for msg, parser in SAMPLES:
        parse = BODY_PARSERS[parser]
        variants = [msg[:n] for n in range(len(msg))]
        variants += [msg[:i] + bytes((msg[i] ^ x,)) + msg[i + 1:]
                     for i in range(len(msg)) for x in (0x01, 0x80, 0xFF)]
        for bad in variants:
            only_protocol_errors(lambda bad=bad, p=parse: p(bad[5:]))
            only_protocol_errors(lambda bad=bad, p=parse: drain_framer(Framer(64), [bad], p))
    for packet in STARTUP_SAMPLES:
        variants = [packet[:n] for n in range(len(packet))]
        variants += [packet[:i] + bytes((packet[i] ^ x,)) + packet[i + 1:]
                     for i in range(len(packet)) for x in (0x01, 0x80, 0xFF)]
        for bad in variants:
            only_protocol_errors(lambda bad=bad: decode_startup(bad[4:]))
            only_protocol_errors(lambda bad=bad: drain_startup(StartupReader(), [bad]))


def test_every_lying_length_of_samples() -> None:
    lies = [*range(0, 40), 10_000, 10_001, 1 << 20, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
    for msg, parser in SAMPLES:
        for lie in lies:
            bad = msg[:1] + _I.pack(lie) + msg[5:]
            only_protocol_errors(lambda bad=bad, p=BODY_PARSERS[parser]: drain_framer(Framer(64), [bad], p))
    for packet in STARTUP_SAMPLES:
        for lie in lies:
            bad = _I.pack(lie) + packet[4:]
            only_protocol_errors(lambda bad=bad: drain_startup(StartupReader(), [bad]))
