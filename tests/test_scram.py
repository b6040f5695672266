"""Tests for proxy.pgwire.scram: RFC 7677 vector, round trips, key relay, SASLprep, md5."""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest

from proxy.pgwire.scram import (
    MECHANISM_PLUS,
    ScramClient,
    ScramError,
    ScramSecret,
    ScramServer,
    make_scram_secret,
    md5_password,
    md5_response,
    parse_scram_secret,
    saslprep,
)

# RFC 7677 section 3 (user "user", password "pencil").
RFC_CLIENT_NONCE = "rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_NONCE = "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0"
RFC_SALT = base64.b64decode("W22ZaJ0SNY7soEsUEjb6gQ==")
RFC_CLIENT_FIRST = b"n,,n=user,r=rOprNGfwEbeRWgbNEkqO"
RFC_SERVER_FIRST = (
    b"r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096"
)
RFC_CLIENT_FINAL = (
    b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,"
    b"p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ="
)
RFC_SERVER_FINAL = b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4="


def rfc_secret() -> ScramSecret:
    return make_scram_secret("pencil", salt=RFC_SALT, iterations=4096)


def login(client: ScramClient, server: ScramServer) -> None:
    server_first = server.server_first(client.client_first())
    server_final = server.server_final(client.client_final(server_first))
    client.verify_server_final(server_final)


def test_rfc7677_vector_client_side() -> None:
    client = ScramClient("pencil", nonce=RFC_CLIENT_NONCE, username="user")
    assert client.client_first() == RFC_CLIENT_FIRST
    assert client.client_final(RFC_SERVER_FIRST) == RFC_CLIENT_FINAL
    client.verify_server_final(RFC_SERVER_FINAL)


def test_rfc7677_vector_server_side() -> None:
    server = ScramServer(rfc_secret(), nonce=RFC_SERVER_NONCE)
    assert server.server_first(RFC_CLIENT_FIRST) == RFC_SERVER_FIRST
    assert server.server_final(RFC_CLIENT_FINAL) == RFC_SERVER_FINAL
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", RFC_SALT, 4096)
    assert server.client_key == hmac.digest(salted, b"Client Key", "sha256")


def test_round_trip_postgres_style() -> None:
    client = ScramClient("correct horse")
    assert client.client_first().startswith(b"n,,n=,r=")
    server = ScramServer(make_scram_secret("correct horse"))
    login(client, server)
    assert len(server.client_key) == 32


def test_random_nonces_are_fresh_base64() -> None:
    nonces = {ScramClient("x").client_first()[8:] for _ in range(5)}
    assert len(nonces) == 5
    assert all(len(base64.b64decode(n, validate=True)) == 18 for n in nonces)


def test_wrong_password_is_rejected() -> None:
    client = ScramClient("wrong")
    server = ScramServer(make_scram_secret("right"))
    client_final = client.client_final(server.server_first(client.client_first()))
    with pytest.raises(ScramError, match="wrong password"):
        server.server_final(client_final)
    with pytest.raises(ScramError):
        _ = server.client_key
    with pytest.raises(ScramError):  # no second guess within one exchange
        server.server_final(client_final)


def test_tampered_server_signature_is_rejected() -> None:
    client = ScramClient("pencil", nonce=RFC_CLIENT_NONCE, username="user")
    client.client_final(RFC_SERVER_FIRST)
    forged = bytearray(base64.b64decode(RFC_SERVER_FINAL[2:]))
    forged[0] ^= 1
    with pytest.raises(ScramError, match="signature mismatch"):
        client.verify_server_final(b"v=" + base64.b64encode(bytes(forged)))
    with pytest.raises(ScramError, match="invalid-proof"):
        client.verify_server_final(b"e=invalid-proof")


def test_verify_requires_client_final_first() -> None:
    with pytest.raises(ScramError):
        ScramClient("x").verify_server_final(RFC_SERVER_FINAL)


def test_recovered_client_key_authenticates_upstream() -> None:
    secret = make_scram_secret("hunter2")
    proxy_side = ScramServer(secret)
    login(ScramClient("hunter2"), proxy_side)
    relay = ScramClient(
        client_key=proxy_side.client_key,
        server_key=secret.server_key,
        salt=secret.salt,
        iterations=secret.iterations,
    )
    upstream = ScramServer(parse_scram_secret(secret.to_text()))  # stands in for PostgreSQL
    login(relay, upstream)
    assert upstream.client_key == proxy_side.client_key


def test_relay_with_other_salt_is_refused_up_front() -> None:
    secret = make_scram_secret("hunter2")
    other = make_scram_secret("hunter2")  # same password, fresh salt
    proxy_side = ScramServer(secret)
    login(ScramClient("hunter2"), proxy_side)
    relay = ScramClient(
        client_key=proxy_side.client_key, server_key=secret.server_key, salt=secret.salt
    )
    with pytest.raises(ScramError, match="salt"):
        relay.client_final(ScramServer(other).server_first(relay.client_first()))
    # Without the up-front check the server still rejects the proof.
    relay = ScramClient(client_key=proxy_side.client_key, server_key=secret.server_key)
    upstream = ScramServer(other)
    final = relay.client_final(upstream.server_first(relay.client_first()))
    with pytest.raises(ScramError):
        upstream.server_final(final)


def test_client_constructor_arguments() -> None:
    key = bytes(32)
    with pytest.raises(ValueError):
        ScramClient()
    with pytest.raises(ValueError):
        ScramClient(client_key=key)
    with pytest.raises(ValueError):
        ScramClient("pw", client_key=key, server_key=key)
    with pytest.raises(ValueError):
        ScramClient(client_key=b"short", server_key=key)
    with pytest.raises(ValueError):
        ScramClient("pw", nonce="has,comma")


@pytest.mark.parametrize(
    "server_first",
    [
        b"r=someoneelse,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nonce not extending ours
        b"r=rOprNGfwEbeRWgbNEkqO,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",  # nothing appended
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=not*base64,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=0",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=10000001",
        b"r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=-1",
        b"m=ext,r=rOprNGfwEbeRWgbNEkqOxyz,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        b"s=W22ZaJ0SNY7soEsUEjb6gQ==,r=rOprNGfwEbeRWgbNEkqOxyz,i=4096",
        b"r=rOprNGfwEbeRWgbNEkqOxyz\xff,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        b"garbage",
    ],
)
def test_client_rejects_bad_server_first(server_first: bytes) -> None:
    client = ScramClient("pencil", nonce=RFC_CLIENT_NONCE)
    with pytest.raises(ScramError):
        client.client_final(server_first)


def test_server_accepts_y_flag_and_checks_its_binding() -> None:
    secret = make_scram_secret("pencil", salt=b"salt", iterations=64)
    server = ScramServer(secret, nonce="srv")
    server_first = server.server_first(b"y,,n=,r=abc").decode()
    assert server_first == "r=abcsrv,s=c2FsdA==,i=64"
    # Build the proof by hand, straight from RFC 5802, with c= = base64("y,,").
    without_proof = "c=eSws,r=abcsrv"
    auth = f"n=,r=abc,{server_first},{without_proof}".encode()
    salted = hashlib.pbkdf2_hmac("sha256", b"pencil", b"salt", 64)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    final = f"{without_proof},p={base64.b64encode(proof).decode()}".encode()
    server_key = hmac.digest(salted, b"Server Key", "sha256")
    expected = b"v=" + base64.b64encode(hmac.digest(server_key, auth, "sha256"))
    assert server.server_final(final) == expected
    assert server.client_key == client_key

    server = ScramServer(secret, nonce="srv")
    server.server_first(b"y,,n=,r=abc")
    with pytest.raises(ScramError, match="channel-binding"):
        server.server_final(final.replace(b"c=eSws", b"c=biws"))


@pytest.mark.parametrize(
    "client_first",
    [
        b"p=tls-server-end-point,,n=,r=abc",  # binding data with plain SCRAM-SHA-256
        b"n,a=admin,n=,r=abc",
        b"x,,n=,r=abc",
        b"n,,r=abc",
        b"n,,n=,r=",
        b"n,,m=ext,n=,r=abc",
        b"n,,n=,r=ab\xffc",
        b"n,n=,r=abc",
    ],
)
def test_server_rejects_bad_client_first(client_first: bytes) -> None:
    with pytest.raises(ScramError):
        ScramServer(rfc_secret()).server_first(client_first)


@pytest.mark.parametrize(
    "client_final",
    [
        RFC_CLIENT_FINAL.replace(b"r=rOpr", b"r=XOpr"),  # nonce mismatch
        RFC_CLIENT_FINAL.replace(b"c=biws", b"c=eSws"),  # binding not matching "n,,"
        RFC_CLIENT_FINAL.split(b",p=")[0],  # no proof
        RFC_CLIENT_FINAL[:-8] + b"A=",  # short proof
        RFC_CLIENT_FINAL.replace(b"p=dHzb", b"p=*Hzb"),  # bad base64
    ],
)
def test_server_rejects_bad_client_final(client_final: bytes) -> None:
    server = ScramServer(rfc_secret(), nonce=RFC_SERVER_NONCE)
    server.server_first(RFC_CLIENT_FIRST)
    with pytest.raises(ScramError):
        server.server_final(client_final)


def test_secret_text_round_trip() -> None:
    secret = rfc_secret()
    text = secret.to_text()
    assert text.startswith("SCRAM-SHA-256$4096:W22ZaJ0SNY7soEsUEjb6gQ==$")
    assert parse_scram_secret(text) == secret
    assert parse_scram_secret(text).to_text() == text
    assert "stored_key" not in repr(secret)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "md5" + "0" * 32,
        "SCRAM-SHA-1$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$0:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$x:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2F*dA==$" + "A" * 43 + "=:" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 42 + "==:" + "A" * 43 + "=",  # 31-byte key
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=",
        "SCRAM-SHA-256$4096:c2FsdA==$" + "A" * 43 + "=:" + "A" * 43 + "=\n",
    ],
)
def test_parse_scram_secret_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_scram_secret(text)


def test_make_scram_secret_rejects_bad_parameters() -> None:
    with pytest.raises(ValueError):
        make_scram_secret("pw", iterations=0)
    with pytest.raises(ValueError):
        make_scram_secret("pw", salt=b"")


@pytest.mark.parametrize(
    ("password", "prepared"),
    [
        ("pencil", b"pencil"),
        ("\x07bell", b"\x07bell"),  # pure ASCII is used as is, like PostgreSQL
        ("I\u00adX", b"IX"),  # RFC 4013: soft hyphen maps to nothing
        ("\u00aa", b"a"),  # NFKC
        ("\u2168", b"IX"),  # NFKC
        ("a\u00a0b", b"a b"),  # non-ASCII space maps to space
        ("\u00ad", "\u00ad".encode()),  # empty after mapping: raw fallback
        ("\u00e9\x07", "\u00e9\x07".encode()),  # prohibited control char: raw fallback
        ("\u0627\u0031", "\u0627\u0031".encode()),  # bidi violation: raw fallback
        ("\u0627\u0628", "\u0627\u0628".encode()),  # valid RTL string
        ("x\U000e0001", "x\U000e0001".encode()),  # tagging char (C.9): raw fallback
    ],
)
def test_saslprep(password: str, prepared: bytes) -> None:
    assert saslprep(password) == prepared


def test_saslprep_equivalent_passwords_authenticate() -> None:
    server = ScramServer(make_scram_secret("I\u00adX", iterations=16))
    login(ScramClient("IX"), server)


def test_md5_password() -> None:
    expected = "md5" + hashlib.md5(b"secretpostgres").hexdigest()
    assert md5_password("postgres", "secret") == expected


def test_md5_response_from_password_and_from_hash() -> None:
    salt = b"\x01\x02\x03\x04"
    inner = hashlib.md5(b"secretpostgres").hexdigest()
    expected = ("md5" + hashlib.md5(inner.encode() + salt).hexdigest()).encode()
    assert md5_response("postgres", "secret", salt) == expected
    assert md5_response("postgres", "md5" + inner, salt) == expected
    assert not md5_response("postgres", "secret", salt).endswith(b"\x00")
    # Uppercase hex is not PostgreSQL's stored form, so it is hashed as a password.
    assert md5_response("postgres", "md5" + inner.upper(), salt) != expected
    with pytest.raises(ValueError):
        md5_response("postgres", "secret", b"abc")


# ---- channel binding (SCRAM-SHA-256-PLUS, tls-server-end-point) ----------------------------------

BINDING = hashlib.sha256(b"the server's certificate, DER").digest()


def _bound_final(server: ScramServer, gs2: str, mechanism: str, binding: bytes,
                 password: str = "pencil") -> bytes:
    """A client-final-message built from RFC 5802 by hand, with c= = base64(gs2 + binding)."""
    server_first = server.server_first(f"{gs2}n=,r=abc".encode(), mechanism).decode()
    salt = base64.b64decode(server_first.split(",s=")[1].split(",")[0])
    nonce = server_first[2:].split(",")[0]
    without_proof = f"c={base64.b64encode(gs2.encode() + binding).decode()},r={nonce}"
    auth = f"n=,r=abc,{server_first},{without_proof}".encode()
    salted = hashlib.pbkdf2_hmac("sha256", password.encode(), salt, 64)
    client_key = hmac.digest(salted, b"Client Key", "sha256")
    signature = hmac.digest(hashlib.sha256(client_key).digest(), auth, "sha256")
    proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
    return f"{without_proof},p={base64.b64encode(proof).decode()}".encode()


def test_plus_with_the_right_binding_authenticates() -> None:
    secret = make_scram_secret("pencil", salt=b"salt", iterations=64)
    server = ScramServer(secret, channel_binding=BINDING)
    final = _bound_final(server, "p=tls-server-end-point,,", MECHANISM_PLUS, BINDING)
    assert server.server_final(final).startswith(b"v=")


@pytest.mark.parametrize(("gs2", "mechanism", "offered", "sent"), [
    ("p=tls-server-end-point,,", MECHANISM_PLUS, BINDING, b"another certificate"),  # MITM
    ("p=tls-unique,,", MECHANISM_PLUS, BINDING, BINDING),  # a type we do not offer
    ("n,,", MECHANISM_PLUS, BINDING, b""),  # -PLUS without binding
    ("p=tls-server-end-point,,", "SCRAM-SHA-256", BINDING, BINDING),  # binding without -PLUS
    ("p=tls-server-end-point,,", MECHANISM_PLUS, None, BINDING),  # -PLUS was not offered
    ("y,,", "SCRAM-SHA-256", BINDING, b""),  # "I could bind, you can't": -PLUS was removed
])
def test_binding_mismatches_are_refused(gs2: str, mechanism: str, offered: bytes | None, sent: bytes) -> None:
    server = ScramServer(make_scram_secret("pencil", salt=b"salt", iterations=64), channel_binding=offered)
    with pytest.raises(ScramError):
        server.server_final(_bound_final(server, gs2, mechanism, sent))


def test_y_flag_is_fine_when_no_binding_was_offered() -> None:
    server = ScramServer(make_scram_secret("pencil", salt=b"salt", iterations=64))
    assert server.server_final(_bound_final(server, "y,,", "SCRAM-SHA-256", b"")).startswith(b"v=")
