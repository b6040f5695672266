"""Client login: startup packet (and TLS), client authentication, and the welcome a client gets.

Rules: every refusal is an ErrorResponse with the SQLSTATE Postgres would send
(Postgres's own bytes when Postgres refused); a cleartext password is only asked for over
TLS or loopback; a password is checked by Postgres, or against the secret Postgres holds for
that user right now (auth_query, read for every login), never against a remembered one.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import secrets
from typing import TYPE_CHECKING, Protocol

from proxy.backends.authquery import UNAVAILABLE, Found
from proxy.backends.backend import Backend, Credentials, LoginError, NeedPassword, connect
from proxy.backends.settings import resync, settings_from_startup
from proxy.doors.wire.admin import ADMIN_DB
from proxy.doors.wire.admin import welcome as admin_welcome
from proxy.pgwire import codes, encode
from proxy.pgwire.decode import (
    CancelRequest,
    GSSENCRequest,
    SSLRequest,
    StartupMessage,
    decode_startup,
    parse_password,
    parse_sasl_initial,
)
from proxy.pgwire.errors import (
    FEATURE_NOT_SUPPORTED,
    INSUFFICIENT_PRIVILEGE,
    INVALID_AUTHORIZATION,
    INVALID_PASSWORD,
    PROTOCOL_VIOLATION,
    TOO_MANY_CONNECTIONS,
    PgError,
)
from proxy.pgwire.scram import (
    MECHANISM,
    MECHANISM_PLUS,
    ScramError,
    ScramSecret,
    ScramServer,
    make_scram_secret,
    md5_response,
)
from proxy.pipeline.session import LoginResult

if TYPE_CHECKING:
    from proxy.backends.pool import Pool
    from proxy.base.tls import TlsChannel
    from proxy.pipeline.runtime import Runtime


class LoginIO(Protocol):
    """What login needs from a client connection."""

    peer: object
    tls: TlsChannel | None  # set once the connection is encrypted

    async def read_packet(self) -> bytes: ...
    async def read_message(self) -> tuple[int, bytes]: ...
    def write(self, data: bytes) -> None: ...
    async def start_tls(self) -> None: ...

    def take_place(self) -> bool: ...


class CancelOnly(Exception):
    """The connection was a CancelRequest; it has been handled."""


async def read_startup(io: LoginIO, server: Runtime) -> StartupMessage:
    while True:
        packet = decode_startup(await io.read_packet())
        if isinstance(packet, SSLRequest) and io.tls is not None:
            raise PgError(PROTOCOL_VIOLATION, "SSLRequest on a connection that is already encrypted",
                          severity="FATAL")
        if isinstance(packet, SSLRequest) and server.tls is not None:
            await io.start_tls()  # 'S', the handshake; the startup packet then comes encrypted
            continue
        if isinstance(packet, SSLRequest | GSSENCRequest):
            io.write(b"N")  # no certificate configured; GSS encryption is not supported
            continue
        if isinstance(packet, CancelRequest):
            # Shielded: a client may hang up right after sending it; the cancel still goes.
            await asyncio.shield(server.spawn(server.cancel(packet.pid, packet.secret)))
            raise CancelOnly()
        return packet


def password_failed(user: str) -> PgError:
    return PgError(INVALID_PASSWORD, f'password authentication failed for user "{user}"',
                   severity="FATAL")


async def login(io: LoginIO, server: Runtime) -> LoginResult:
    startup = await read_startup(io, server)
    params = startup.params
    extensions = [k for k in params if k.startswith("_pq_.")]
    if startup.minor > 0 or extensions:
        io.write(encode.negotiate_protocol_version(0, extensions))
    for key in extensions:
        del params[key]
    if params.get("replication", "false").lower() not in ("false", "off", "no", "0"):
        raise PgError(FEATURE_NOT_SUPPORTED, "pgsluice does not proxy replication connections",
                      severity="FATAL")
    user = params.get("user", "")
    if not user:
        raise PgError(INVALID_AUTHORIZATION,
                      "no PostgreSQL user name specified in startup packet", severity="FATAL")
    database = params.get("database") or user
    if server.tls is not None and server.tls.required and io.tls is None:
        host = io.peer[0] if isinstance(io.peer, tuple) and io.peer else io.peer  # Postgres's words
        raise PgError(INVALID_AUTHORIZATION, f'no pg_hba.conf entry for host "{host}", user "{user}", '
                      f'database "{database}", no encryption', severity="FATAL")
    if database != ADMIN_DB and not io.take_place():  # the admin console is always let in
        raise PgError(TOO_MANY_CONNECTIONS, "sorry, too many clients already", severity="FATAL")
    settings = settings_from_startup(params)
    if database == ADMIN_DB:
        await _admin_login(io, server, user)
        return LoginResult(user, database, params, None, (), admin_welcome(server))

    mode = server.config.auth_mode
    if mode == "passthrough":
        pool, probe = await _passthrough(io, server, user, database)
    else:
        creds = await _auth_file(io, server, user) if mode == "auth_file" else server.default_creds(user)
        io.write(encode.auth_ok())
        pool, probe = server.pool(database, user), None
        if mode == "auth_file":
            pool.creds = creds
    try:
        welcome = await _welcome(pool, settings, probe)
    except (LoginError, PgError, NeedPassword) as exc:
        if pool.size == 0 and not pool.waiters:
            server.pools.pop(pool.key, None)  # a mistyped database leaves no pool behind
        if isinstance(exc, NeedPassword):  # pg_hba asks for a method the keys cannot answer
            raise PgError(INVALID_AUTHORIZATION, f'pgsluice: Postgres asks for user "{user}"\'s '
                          "cleartext password, which pgsluice does not have (it has SCRAM keys)",
                          severity="FATAL", hint="Use scram-sha-256 in pg_hba.conf for pgsluice's "
                          "connections.") from None
        raise
    return LoginResult(user, database, params, pool, settings, welcome)


async def _admin_login(io: LoginIO, server: Runtime, user: str) -> None:
    """The admin console: the user authenticates as for any database (in passthrough mode,
    Postgres checks the password against the upstream URL's database), then must be an admin."""
    mode = server.config.auth_mode
    if mode == "passthrough":
        pool, probe = await _passthrough(io, server, user, server.admin_database())
        if probe is not None:
            pool.release(probe)
    elif mode == "auth_file":
        await _auth_file(io, server, user)
        io.write(encode.auth_ok())
    else:
        io.write(encode.auth_ok())
    if user not in server.admin_users():
        raise PgError(INSUFFICIENT_PRIVILEGE, f'pgsluice: user "{user}" may not use the admin console',
                      severity="FATAL", hint="Admins are listed in the admin_users setting.")


# ---- passthrough: Postgres decides, directly or through the secret it holds ---------------

async def _passthrough(io: LoginIO, server: Runtime, user: str,
                       database: str) -> tuple[Pool, Backend | None]:
    found = await server.auth_query.lookup(user) if server.auth_query is not None else UNAVAILABLE
    if found.has_secret:  # SCRAM (or md5) with the client; Postgres gets the keys it proved
        creds = await _check_secret(io, server, user, found)
        proved = server.pool(database, user)
        proved.creds = creds
        io.write(encode.auth_ok())
        return proved, None
    known = server.pools.get((database, user))
    trusted = known is not None and known.trusted
    if trusted and found.kind != "missing":
        assert known is not None
        io.write(encode.auth_ok())
        return known, None
    if trusted or known is None or not known.creds.any():
        try:  # Postgres may ask this user for nothing (trust), or refuse the role itself
            backend = await _server_login(io, server, user, database, Credentials())
        except NeedPassword:
            pass
        else:
            pool = server.pool(database, user)
            pool.trusted = True
            io.write(encode.auth_ok())
            return pool, backend if pool.adopt(backend) else None
    if not _cleartext_ok(io):
        if found.kind != "unavailable":  # no usable secret: fail as Postgres does, after an exchange
            await _scram(io, server, user, None)
        raise PgError(INVALID_AUTHORIZATION,
                      "pgsluice: a password from a non-local client needs TLS or a readable "
                      "secret (auth_query)", severity="FATAL",
                      hint="Connect with sslmode=require." if server.tls is not None else
                      "Configure tls_cert and tls_key, or auth_user and auth_query.")
    password = await _ask_cleartext(io, user)
    try:
        backend = await _server_login(io, server, user, database, Credentials(password=password))
    except NeedPassword:
        raise password_failed(user) from None
    pool = server.pool(database, user)
    pool.creds = Credentials(password=password)  # checked by Postgres just now
    io.write(encode.auth_ok())
    return pool, backend if pool.adopt(backend) else None


async def _server_login(io: LoginIO, server: Runtime, user: str, database: str,
                        creds: Credentials) -> Backend:
    try:
        return await connect(server.upstream, user, database, creds, server.config.connect_timeout)
    except LoginError as err:
        if err.after_auth:
            io.write(encode.auth_ok())  # Postgres authenticates before it looks up the database
        raise


def _is_local(peer: object) -> bool:
    if isinstance(peer, tuple) and peer:
        try:
            return ipaddress.ip_address(str(peer[0]).split("%")[0]).is_loopback
        except ValueError:
            return False
    return isinstance(peer, str)  # unix socket


def _cleartext_ok(io: LoginIO) -> bool:
    return io.tls is not None or _is_local(io.peer)


async def _ask_cleartext(io: LoginIO, user: str) -> str:
    io.write(encode.auth_request(codes.AUTH_CLEARTEXT))
    code, body = await io.read_message()
    if code != codes.F_PASSWORD:
        raise PgError(PROTOCOL_VIOLATION, f"expected password response, got message type {code}",
                      severity="FATAL")
    try:
        return parse_password(body).decode()
    except UnicodeDecodeError:
        raise password_failed(user) from None


# ---- pgsluice checks a secret: auth_query's, or auth_file's -------------------------------

async def _check_secret(io: LoginIO, server: Runtime, user: str, found: Found) -> Credentials:
    """SCRAM (md5 for an md5 hash) with the client against `found`; the credentials that log
    in to Postgres as that user. 28P01 when the client's proof is wrong."""
    if found.kind == "md5":
        await _md5(io, user, found.value)
        return Credentials(md5=found.value)
    if found.kind == "plain":
        await _scram(io, server, user, server.scram_secret_for(user, found.value))
        return Credentials(password=found.value)
    assert found.scram is not None
    scram = await _scram(io, server, user, found.scram)
    return Credentials(scram_keys=(scram.client_key, found.scram.server_key))


async def _md5(io: LoginIO, user: str, stored: str) -> None:
    salt = secrets.token_bytes(4)
    io.write(encode.auth_request(codes.AUTH_MD5, salt))
    code, body = await io.read_message()
    if code != codes.F_PASSWORD:
        raise PgError(PROTOCOL_VIOLATION, "expected password response", severity="FATAL")
    if not hmac.compare_digest(parse_password(body), md5_response(user, stored, salt)):
        raise password_failed(user)


async def _scram(io: LoginIO, server: Runtime, user: str, secret: ScramSecret | None) -> ScramServer:
    """One SCRAM-SHA-256 exchange (-PLUS offered over TLS when the certificate allows channel
    binding). Without a secret the exchange runs with a random one and fails, as Postgres does
    for an unknown user, so a refusal tells nothing about which users exist."""
    binding = server.tls.end_point if io.tls is not None and server.tls is not None else None
    mechanisms = [MECHANISM_PLUS, MECHANISM] if binding is not None else [MECHANISM]
    scram = ScramServer(secret or make_scram_secret(secrets.token_hex(16)), channel_binding=binding)
    io.write(encode.auth_sasl(mechanisms))
    try:
        code, body = await io.read_message()
        if code != codes.F_PASSWORD:
            raise PgError(PROTOCOL_VIOLATION, "expected SASL response", severity="FATAL")
        mechanism, first = parse_sasl_initial(body)
        if mechanism not in mechanisms:
            raise PgError(PROTOCOL_VIOLATION, "client selected an invalid SASL authentication "
                          "mechanism", severity="FATAL")
        io.write(encode.auth_request(codes.AUTH_SASL_CONTINUE, scram.server_first(first, mechanism)))
        code, body = await io.read_message()
        if code != codes.F_PASSWORD:
            raise PgError(PROTOCOL_VIOLATION, "expected SASL response", severity="FATAL")
        final = scram.server_final(body)
    except ScramError:
        raise password_failed(user) from None
    if secret is None:
        raise password_failed(user)
    io.write(encode.auth_request(codes.AUTH_SASL_FINAL, final))
    return scram


async def _auth_file(io: LoginIO, server: Runtime, user: str) -> Credentials:
    cred = server.userlist.get(user)
    if cred is not None and cred.kind == "md5":
        await _md5(io, user, cred.value)
        return Credentials(md5=cred.value)
    if cred is None:
        await _scram(io, server, user, None)
        raise password_failed(user)  # not reached: the exchange fails
    secret = cred.scram if cred.scram is not None else server.scram_secret_for(user, cred.value)
    scram = await _scram(io, server, user, secret)
    if cred.kind == "plain":
        return Credentials(password=cred.value)
    return Credentials(scram_keys=(scram.client_key, secret.server_key))


# ---- welcome: the ParameterStatus set Postgres would report for these settings ---------------

async def _welcome(pool: Pool, settings: tuple[tuple[str, str], ...],
                   probe: Backend | None) -> dict[str, str]:
    cached = pool.status_cache.get(settings)
    if cached is None:
        backend = probe if probe is not None else await pool.acquire()
        try:
            backend.applied = None
            await resync(backend, settings)
        except BaseException:
            pool.discard(backend)
            raise
        # Postgres reports a parameter only when it differs from what it last reported on
        # that connection, so what the resync reported is not enough (the previous client
        # may have left the same value): every value as last reported is this session's.
        cached = dict(backend.params)
        pool.release(backend)
        pool.status_cache[settings] = cached
    elif probe is not None:
        pool.release(probe)
    return dict(cached)
