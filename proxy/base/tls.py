"""TLS for the doors (clients in) and for server connections (Postgres out), with Python's ssl.

Rules: TLS 1.2 or newer both ways; a client hears 'S' only when a certificate is configured
and tls_mode is not disable; with tls_ca every TLS client must present a certificate that CA
signed. A client's TLS runs in memory over its own transport (ssl.MemoryBIO, as asyncio's
sslproto does) rather than through loop.start_tls: with Postgres 17's direct negotiation the
ClientHello is the first thing a client sends, and by the time we know it is TLS those bytes
have been read.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from proxy.base.errors import ConfigError

if TYPE_CHECKING:
    from proxy.base.config import Config

HANDSHAKE = 0x16  # first byte of a TLS handshake record: a client negotiating directly
ALPN = "postgresql"  # Postgres 17's ALPN name; direct negotiation requires it
_READ = 16 * 1024  # one TLS record's plaintext at most


@dataclass(frozen=True, slots=True)
class DoorTls:
    """TLS towards clients: the wire door's context and what the login needs to know."""

    context: ssl.SSLContext
    required: bool  # tls_mode = require: plain clients are refused
    end_point: bytes | None  # tls-server-end-point data for SCRAM-SHA-256-PLUS (None: not offered)


def door_tls(config: Config) -> DoorTls | None:
    if not config.tls_cert or config.tls_mode == "disable":
        return None
    return DoorTls(door_context(config, alpn=True), config.tls_mode == "require",
                   server_end_point(config.tls_cert))


def door_context(config: Config, alpn: bool = False) -> ssl.SSLContext:
    """A server-side context from tls_cert/tls_key (and tls_ca for client certificates)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # No renegotiation (a CPU sink for clients), no session tickets (Postgres sends none either)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET
    ctx.num_tickets = 0
    try:
        ctx.load_cert_chain(config.tls_cert, config.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"tls_cert/tls_key: cannot load {config.tls_cert} / {config.tls_key}: "
                          f"{getattr(exc, 'strerror', None) or exc}") from None
    if config.tls_ca:
        try:
            ctx.load_verify_locations(cafile=config.tls_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"tls_ca: cannot load {config.tls_ca}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        ctx.verify_mode = ssl.CERT_REQUIRED
    if alpn:
        ctx.set_alpn_protocols([ALPN])
    return ctx


def check_files(config: Config) -> None:
    """Load every certificate, key and CA the config names: a bad one is a ConfigError now,
    naming the file, rather than a failure at the first connection."""
    if config.tls_cert:
        door_context(config)
    upstream_tls(config)


def server_end_point(cert_file: str) -> bytes | None:
    """RFC 5929 tls-server-end-point: the leaf certificate hashed with its signature's hash
    (SHA-256 for MD5 and SHA-1), as Postgres computes it; None when that hash is unknown
    (Ed25519, say), and then SCRAM-SHA-256-PLUS is not offered."""
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import hashes, serialization

    try:
        with open(cert_file, "rb") as f:
            cert = x509.load_pem_x509_certificates(f.read())[0]
        algorithm = cert.signature_hash_algorithm
    except (OSError, ValueError, UnsupportedAlgorithm):
        return None
    if algorithm is None:
        return None
    if isinstance(algorithm, hashes.MD5 | hashes.SHA1):
        algorithm = hashes.SHA256()
    digest = hashes.Hash(algorithm)
    digest.update(cert.public_bytes(serialization.Encoding.DER))
    return digest.finalize()


# ---- a client's TLS session, over its raw transport ----------------------------------------

class TlsChannel(asyncio.Transport):
    """Decrypts what the raw transport received (`receive`) and encrypts what the session
    writes; the session installs it as its transport, so nothing else changes for TLS."""

    def __init__(self, context: ssl.SSLContext, raw: asyncio.Transport) -> None:
        super().__init__()
        self.raw = raw
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self._in, self._out, server_side=True)
        self.ready = False  # handshake done
        self._closing = False

    def receive(self, data: bytes) -> bytes:
        """Raw bytes in, plaintext out (b"" while the handshake runs). Raises ssl.SSLError,
        after flushing the alert that tells the client why."""
        self._in.write(data)
        try:
            if not self.ready:
                try:
                    self.obj.do_handshake()
                except ssl.SSLWantReadError:
                    return b""
                self.ready = True
            chunks = []
            while True:
                try:
                    chunk = self.obj.read(_READ)
                except ssl.SSLWantReadError:
                    break
                except ssl.SSLZeroReturnError:
                    chunk = b""
                if not chunk:  # close_notify: the client is done
                    self.raw.close()
                    break
                chunks.append(chunk)
                if not self._in.pending and not self.obj.pending():
                    break  # all read: spare the call that would only say "want read"
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)
        finally:
            self._flush()

    def _flush(self) -> None:
        if self._out.pending:
            self.raw.write(self._out.read())

    # ---- asyncio.Transport, for the session ----

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closing or not self.ready:
            return  # nothing can be said to a client whose handshake did not finish
        try:
            self.obj.write(data)
        except ssl.SSLError:
            self.raw.abort()
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if self.ready:
            with contextlib.suppress(ssl.SSLError):
                self.obj.unwrap()  # queues close_notify
            self._flush()
        self.raw.close()

    def abort(self) -> None:
        self._closing = True
        self.raw.abort()

    def is_closing(self) -> bool:
        return self._closing or self.raw.is_closing()

    def pause_reading(self) -> None:
        self.raw.pause_reading()

    def resume_reading(self) -> None:
        self.raw.resume_reading()

    def is_reading(self) -> bool:
        return self.raw.is_reading()

    def get_write_buffer_size(self) -> int:
        return self.raw.get_write_buffer_size()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.raw.set_write_buffer_limits(high, low)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self.obj
        if name == "peercert":
            return self.obj.getpeercert()
        if name == "cipher":
            return self.obj.cipher()
        return self.raw.get_extra_info(name, default)


# ---- towards Postgres ---------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """server_tls_mode and its context; `required`: a server that says 'N' is an error."""

    mode: str
    context: ssl.SSLContext

    @property
    def required(self) -> bool:
        return self.mode != "prefer"


def upstream_tls(config: Config) -> UpstreamTls | None:
    mode = config.server_tls_mode
    if mode == "disable":
        return None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if mode in ("prefer", "require"):  # encryption only, as libpq and PgBouncer do
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    else:
        try:
            if config.server_tls_ca:
                ctx.load_verify_locations(cafile=config.server_tls_ca)
            else:
                ctx.load_default_certs()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"server_tls_ca: cannot load {config.server_tls_ca}: "
                              f"{getattr(exc, 'strerror', None) or exc}") from None
        ctx.check_hostname = mode == "verify-full"
    ctx.set_alpn_protocols([ALPN])
    return UpstreamTls(mode, ctx)


def asyncpg_ssl(tls: UpstreamTls | None, host: str) -> Any:
    """asyncpg's `ssl` argument for the same policy as the pool's connections."""
    if tls is None or host.startswith("/"):
        return False
    return "prefer" if tls.mode == "prefer" else tls.context
