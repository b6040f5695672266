"""SCRAM-SHA-256 and md5 password authentication as PostgreSQL speaks it, with no I/O.

Rules kept: as a client we send "n,," (no channel binding); as a server we accept "n,,", "y,,"
only when we offered no binding (else it is a downgrade), and "p=tls-server-end-point" only
with SCRAM-SHA-256-PLUS and the binding data we were given; the user name travels in the
startup packet so SCRAM's "n=" is sent empty and ignored, passwords go through PostgreSQL's
SASLprep with its raw-bytes fallback, and secrets are compared in constant time.

>>> md5_password("postgres", "secret") == "md5" + hashlib.md5(b"secretpostgres").hexdigest()
True
>>> secret = make_scram_secret("pencil", salt=b"NaCl", iterations=4096)
>>> parse_scram_secret(secret.to_text()) == secret
True
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import stringprep
import unicodedata
from dataclasses import dataclass, field

MECHANISM = "SCRAM-SHA-256"
MECHANISM_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING = "tls-server-end-point"  # the one binding type Postgres and libpq use
MAX_ITERATIONS = 10_000_000  # the most a client will agree to compute for a server
_MAX_SECRET_ITERATIONS = 2**31 - 1  # PostgreSQL's scram_iterations limit (INT_MAX)
_KEY_LEN = 32
_SECRET_RE = re.compile(r"SCRAM-SHA-256\$([0-9]{1,10}):([^$:]+)\$([^$:]+):([^$:]+)")
_MD5_RE = re.compile(r"md5[0-9a-f]{32}")
_sp = stringprep
_PROHIBITED = (  # RFC 4013 section 2.3 plus unassigned code points (A.1)
    _sp.in_table_c12, _sp.in_table_c21_c22, _sp.in_table_c3, _sp.in_table_c4, _sp.in_table_c5,
    _sp.in_table_c6, _sp.in_table_c7, _sp.in_table_c8, _sp.in_table_c9, _sp.in_table_a1,
)  # fmt: skip


class ScramError(Exception):
    """A SCRAM exchange failed: malformed message, wrong password or unverifiable server."""


@dataclass(frozen=True, slots=True)
class ScramSecret:
    """A stored SCRAM-SHA-256 verifier, as in pg_authid.rolpassword (keys kept out of repr)."""

    iterations: int
    salt: bytes
    stored_key: bytes = field(repr=False)
    server_key: bytes = field(repr=False)

    def to_text(self) -> str:
        """PostgreSQL's text form: ``SCRAM-SHA-256$<iter>:<salt>$<StoredKey>:<ServerKey>``."""
        salt, stored, server = map(_b64, (self.salt, self.stored_key, self.server_key))
        return f"{MECHANISM}${self.iterations}:{salt}${stored}:{server}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: str, what: str = "") -> bytes:
    """Strict base64; ValueError on bad input, or ScramError naming *what* if given."""
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except ValueError:
        if what:
            raise ScramError(f"invalid base64 in SCRAM {what}") from None
        raise


def _hmac(key: bytes, msg: bytes) -> bytes:
    return hmac.digest(key, msg, "sha256")


def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b, strict=True))


def _new_nonce() -> str:
    return _b64(secrets.token_bytes(18))


def _valid_nonce(nonce: str) -> bool:
    """RFC 5802 ``printable``: %x21-7E except ','."""
    return bool(nonce) and all("!" <= c <= "~" and c != "," for c in nonce)


def parse_scram_secret(text: str) -> ScramSecret:
    """Parse PostgreSQL's SCRAM-SHA-256 secret text; raise ValueError if it is not one."""
    m = _SECRET_RE.fullmatch(text)
    if m is None:
        raise ValueError("not a SCRAM-SHA-256 secret")
    iterations = int(m[1])
    if not 1 <= iterations <= _MAX_SECRET_ITERATIONS:
        raise ValueError(f"SCRAM secret iteration count {iterations} out of range")
    salt, stored_key, server_key = (_unb64(m[i]) for i in (2, 3, 4))
    if len(stored_key) != _KEY_LEN or len(server_key) != _KEY_LEN:
        raise ValueError("SCRAM secret keys must be 32 bytes")
    return ScramSecret(iterations, salt, stored_key, server_key)


def saslprep(password: str) -> bytes:
    """The bytes PostgreSQL hashes for *password*: SASLprep (RFC 4013), else raw UTF-8.

    Like pg_saslprep: pure ASCII is used as is; an empty mapping result, a prohibited
    character or a bidi violation means "use the raw bytes"; the checks run on the mapped
    code points and NFKC only shapes the output.
    """
    raw = password.encode("utf-8", "surrogateescape")
    if password.isascii():
        return raw
    mapped = "".join(" " if _sp.in_table_c12(c) else c for c in password if not _sp.in_table_b1(c))
    if not mapped or any(table(c) for c in mapped for table in _PROHIBITED):
        return raw
    if any(map(_sp.in_table_d1, mapped)) and (
        any(map(_sp.in_table_d2, mapped))
        or not (_sp.in_table_d1(mapped[0]) and _sp.in_table_d1(mapped[-1]))
    ):
        return raw
    return unicodedata.normalize("NFKC", mapped).encode("utf-8")


def _keys(password: str, salt: bytes, iterations: int) -> tuple[bytes, bytes]:
    """(ClientKey, ServerKey) for *password*."""
    salted = hashlib.pbkdf2_hmac("sha256", saslprep(password), salt, iterations)
    return _hmac(salted, b"Client Key"), _hmac(salted, b"Server Key")


def make_scram_secret(
    password: str, *, salt: bytes | None = None, iterations: int = 4096
) -> ScramSecret:
    """Build the verifier PostgreSQL would store for *password* (random 16-byte salt)."""
    salt = secrets.token_bytes(16) if salt is None else salt
    if not salt or not 1 <= iterations <= _MAX_SECRET_ITERATIONS:
        raise ValueError("salt must not be empty and iterations must be in 1..2**31-1")
    client_key, server_key = _keys(password, salt, iterations)
    return ScramSecret(iterations, salt, hashlib.sha256(client_key).digest(), server_key)


def _decode(message: bytes) -> str:
    try:
        return message.decode("utf-8")
    except UnicodeDecodeError:
        raise ScramError("SCRAM message is not valid UTF-8") from None


def _attrs(text: str) -> list[tuple[str, str]]:
    """Split ``a=x,b=y`` into pairs, refusing the mandatory-extension attribute ``m``."""
    out: list[tuple[str, str]] = []
    for part in text.split(","):
        if part[1:2] != "=" or not (part[:1].isascii() and part[:1].isalpha()):
            raise ScramError("malformed SCRAM message")
        out.append((part[0], part[2:]))
    if out[0][0] == "m":
        raise ScramError("unsupported mandatory SCRAM extension")
    return out


def _expect(attrs: list[tuple[str, str]], index: int, name: str) -> str:
    if index >= len(attrs) or attrs[index][0] != name:
        raise ScramError(f"malformed SCRAM message: expected attribute {name!r}")
    return attrs[index][1]


class ScramClient:
    """Logs in to a PostgreSQL server: client_first -> client_final -> verify_server_final.

    Give a *password*, or the *client_key*/*server_key* pair a ScramServer recovered from a
    client; those only work if the server's secret has the same salt and iteration count
    (pass *salt*/*iterations* to have that checked). *username* is for RFC test vectors.
    """

    def __init__(
        self,
        password: str | None = None,
        *,
        client_key: bytes | None = None,
        server_key: bytes | None = None,
        nonce: str | None = None,
        username: str = "",
        salt: bytes | None = None,
        iterations: int | None = None,
    ) -> None:
        keys = (client_key, server_key)
        if password is None and None in keys:
            raise ValueError("give a password, or both client_key and server_key")
        if password is not None and keys != (None, None):
            raise ValueError("give a password or keys, not both")
        if any(k is not None and len(k) != _KEY_LEN for k in keys):
            raise ValueError("SCRAM-SHA-256 keys must be 32 bytes")
        self._password, self._keys = password, keys
        self._nonce = _new_nonce() if nonce is None else nonce
        if not _valid_nonce(self._nonce):
            raise ValueError("nonce must be printable ASCII without ','")
        user = username.replace("=", "=3D").replace(",", "=2C")
        self._first_bare = f"n={user},r={self._nonce}"
        self._salt, self._iterations = salt, iterations
        self._server_signature: bytes | None = None

    def client_first(self) -> bytes:
        """The client-first-message, i.e. the SASLInitialResponse data."""
        return f"n,,{self._first_bare}".encode()

    def client_final(self, server_first: bytes) -> bytes:
        """Answer the server-first-message (AuthenticationSASLContinue data) with our proof."""
        if self._server_signature is not None:
            raise ScramError("client_final called twice")
        text = _decode(server_first)
        attrs = _attrs(text)
        nonce, salt_b64, iter_text = (_expect(attrs, i, n) for i, n in enumerate("rsi"))
        if not (nonce.startswith(self._nonce) and len(nonce) > len(self._nonce)):
            raise ScramError("server nonce does not extend the client nonce")
        if not _valid_nonce(nonce):
            raise ScramError("invalid SCRAM server nonce")
        salt = _unb64(salt_b64, "salt")
        iterations = int(iter_text) if re.fullmatch("[0-9]{1,8}", iter_text) else 0
        if not salt or not 1 <= iterations <= MAX_ITERATIONS:
            raise ScramError(f"unacceptable SCRAM salt or iteration count {iter_text!r}")
        if (self._salt is not None and salt != self._salt) or self._iterations not in (
            None, iterations,
        ):  # fmt: skip
            raise ScramError("server's SCRAM salt/iterations differ from those of our keys")
        client_key, server_key = self._keys
        if self._password is not None:
            client_key, server_key = _keys(self._password, salt, iterations)
        assert client_key is not None and server_key is not None
        without_proof = f"c=biws,r={nonce}"
        auth = f"{self._first_bare},{text},{without_proof}".encode()
        self._server_signature = _hmac(server_key, auth)
        proof = _xor(client_key, _hmac(hashlib.sha256(client_key).digest(), auth))
        return f"{without_proof},p={_b64(proof)}".encode()

    def verify_server_final(self, server_final: bytes) -> None:
        """Check the server-final-message (AuthenticationSASLFinal data); raise ScramError."""
        if self._server_signature is None:
            raise ScramError("verify_server_final called before client_final")
        name, value = _attrs(_decode(server_final))[0]
        if name == "e":
            raise ScramError(f"server rejected SCRAM authentication: {value}")
        if name != "v":
            raise ScramError("malformed SCRAM server-final-message")
        if not hmac.compare_digest(_unb64(value, "server signature"), self._server_signature):
            raise ScramError("SCRAM server signature mismatch: server does not know the secret")


class ScramServer:
    """Authenticates a client against a ScramSecret: server_first -> server_final.

    *channel_binding* is the tls-server-end-point data of the connection when the server
    offered SCRAM-SHA-256-PLUS (None: not offered). After success ``client_key`` is the
    client's ClientKey, with which a ScramClient can log in to a PostgreSQL server storing
    the same secret.
    """

    def __init__(self, secret: ScramSecret, *, nonce: str | None = None,
                 channel_binding: bytes | None = None) -> None:
        self._secret = secret
        self._binding = channel_binding
        self._bound = b""  # the binding data the client's c= must carry
        self._suffix = _new_nonce() if nonce is None else nonce
        if not _valid_nonce(self._suffix):
            raise ValueError("nonce must be printable ASCII without ','")
        self._gs2 = self._first_bare = self._server_first = ""
        self._nonce: str | None = None
        self._finished = False
        self._client_key: bytes | None = None

    @property
    def client_key(self) -> bytes:
        """The ClientKey recovered from a successful proof."""
        if self._client_key is None:
            raise ScramError("client has not authenticated")
        return self._client_key

    def server_first(self, client_first: bytes, mechanism: str = MECHANISM) -> bytes:
        """Answer the client-first-message (SASLInitialResponse data for *mechanism*)."""
        if self._nonce is not None:
            raise ScramError("server_first called twice")
        flag, _, rest = _decode(client_first).partition(",")
        authzid, sep, bare = rest.partition(",")
        if not sep:
            raise ScramError("malformed SCRAM GS2 header")
        if mechanism == MECHANISM_PLUS:
            if self._binding is None:
                raise ScramError("client selected SCRAM-SHA-256-PLUS, which was not offered")
            if flag != f"p={CHANNEL_BINDING}":
                raise ScramError(f"client uses channel binding {flag[2:]!r}; only {CHANNEL_BINDING} "
                                 "is supported" if flag.startswith("p=") else
                                 "client selected SCRAM-SHA-256-PLUS without channel binding data")
            self._bound = self._binding
        elif mechanism != MECHANISM:
            raise ScramError(f"unsupported SASL mechanism {mechanism!r}")
        elif flag.startswith("p="):
            raise ScramError("client selected SCRAM-SHA-256 but sent channel binding data")
        elif flag == "y" and self._binding is not None:
            # the client could bind and thinks we cannot: someone removed -PLUS on the way
            raise ScramError("SCRAM channel binding negotiation error")
        elif flag not in ("n", "y"):
            raise ScramError("malformed SCRAM GS2 header")
        if authzid:
            raise ScramError("SCRAM authorization identities are not supported")
        attrs = _attrs(bare)
        _expect(attrs, 0, "n")  # the user name is ignored: the startup packet names the user
        client_nonce = _expect(attrs, 1, "r")
        if not _valid_nonce(client_nonce):
            raise ScramError("invalid SCRAM client nonce")
        self._gs2, self._first_bare = f"{flag},,", bare
        self._nonce = client_nonce + self._suffix
        secret = self._secret
        self._server_first = f"r={self._nonce},s={_b64(secret.salt)},i={secret.iterations}"
        return self._server_first.encode()

    def server_final(self, client_final: bytes) -> bytes:
        """Check the client's proof; return the server-final-message or raise ScramError."""
        if self._nonce is None or self._finished:
            raise ScramError("server_final must follow server_first, once")
        self._finished = True  # one proof per exchange, whatever the outcome
        head, sep, proof_b64 = _decode(client_final).rpartition(",p=")
        if not sep:
            raise ScramError("SCRAM client-final-message has no proof")
        attrs = _attrs(head)
        if _expect(attrs, 0, "c") != _b64(self._gs2.encode() + self._bound):
            raise ScramError("SCRAM channel-binding data does not match the GS2 header")
        if _expect(attrs, 1, "r") != self._nonce:
            raise ScramError("SCRAM nonce mismatch")
        proof = _unb64(proof_b64, "proof")
        if len(proof) != _KEY_LEN:
            raise ScramError("invalid SCRAM proof length")
        auth = f"{self._first_bare},{self._server_first},{head}".encode()
        client_key = _xor(proof, _hmac(self._secret.stored_key, auth))
        if not hmac.compare_digest(hashlib.sha256(client_key).digest(), self._secret.stored_key):
            raise ScramError("SCRAM authentication failed: wrong password")
        self._client_key = client_key
        return f"v={_b64(_hmac(self._secret.server_key, auth))}".encode()


def is_md5_hash(text: str) -> bool:
    """True for PostgreSQL's stored md5 form: "md5" + 32 lowercase hex digits."""
    return _MD5_RE.fullmatch(text) is not None


def _md5_hex(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def md5_password(user: str, password: str) -> str:
    """PostgreSQL's stored md5 password: ``"md5" + md5(password + user)``."""
    return "md5" + _md5_hex((password + user).encode())


def md5_response(user: str, password_or_hash: str, salt: bytes) -> bytes:
    """PasswordMessage payload (no trailing NUL) answering AuthenticationMD5Password(salt)."""
    if len(salt) != 4:
        raise ValueError("md5 salt must be 4 bytes")
    stored = password_or_hash
    if not is_md5_hash(stored):
        stored = md5_password(user, password_or_hash)
    return ("md5" + _md5_hex(stored[3:].encode("ascii") + salt)).encode("ascii")
