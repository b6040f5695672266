"""Message type bytes and protocol constants of the PostgreSQL v3 protocol, named once.

Frontend (F) and backend (B) codes share letters ('D', 'E', 'C', ...): the
direction is part of the name.
"""

from typing import Final

# Startup-phase request codes (the int32 after the length of an untyped packet).
PROTOCOL_3_0: Final = 196608  # 3 << 16
SSL_REQUEST: Final = 80877103
GSSENC_REQUEST: Final = 80877104
CANCEL_REQUEST: Final = 80877102

# Frontend messages.
F_BIND: Final = ord("B")
F_CLOSE: Final = ord("C")
F_COPY_DATA: Final = ord("d")
F_COPY_DONE: Final = ord("c")
F_COPY_FAIL: Final = ord("f")
F_DESCRIBE: Final = ord("D")
F_EXECUTE: Final = ord("E")
F_FLUSH: Final = ord("H")
F_FUNCTION_CALL: Final = ord("F")
F_PARSE: Final = ord("P")
F_PASSWORD: Final = ord("p")  # also SASLInitialResponse / SASLResponse / GSSResponse
F_QUERY: Final = ord("Q")
F_SYNC: Final = ord("S")
F_TERMINATE: Final = ord("X")

FRONTEND_CODES: Final = frozenset(
    {F_BIND, F_CLOSE, F_COPY_DATA, F_COPY_DONE, F_COPY_FAIL, F_DESCRIBE, F_EXECUTE,
     F_FLUSH, F_FUNCTION_CALL, F_PARSE, F_PASSWORD, F_QUERY, F_SYNC, F_TERMINATE}
)

# Backend messages.
B_AUTHENTICATION: Final = ord("R")
B_BACKEND_KEY_DATA: Final = ord("K")
B_BIND_COMPLETE: Final = ord("2")
B_CLOSE_COMPLETE: Final = ord("3")
B_COMMAND_COMPLETE: Final = ord("C")
B_COPY_BOTH_RESPONSE: Final = ord("W")
B_COPY_DATA: Final = ord("d")
B_COPY_DONE: Final = ord("c")
B_COPY_IN_RESPONSE: Final = ord("G")
B_COPY_OUT_RESPONSE: Final = ord("H")
B_DATA_ROW: Final = ord("D")
B_EMPTY_QUERY_RESPONSE: Final = ord("I")
B_ERROR_RESPONSE: Final = ord("E")
B_FUNCTION_CALL_RESPONSE: Final = ord("V")
B_NEGOTIATE_PROTOCOL_VERSION: Final = ord("v")
B_NO_DATA: Final = ord("n")
B_NOTICE_RESPONSE: Final = ord("N")
B_NOTIFICATION_RESPONSE: Final = ord("A")
B_PARAMETER_DESCRIPTION: Final = ord("t")
B_PARAMETER_STATUS: Final = ord("S")
B_PARSE_COMPLETE: Final = ord("1")
B_PORTAL_SUSPENDED: Final = ord("s")
B_READY_FOR_QUERY: Final = ord("Z")
B_ROW_DESCRIPTION: Final = ord("T")

# Authentication request subcodes (the int32 inside 'R').
AUTH_OK: Final = 0
AUTH_CLEARTEXT: Final = 3
AUTH_MD5: Final = 5
AUTH_SASL: Final = 10
AUTH_SASL_CONTINUE: Final = 11
AUTH_SASL_FINAL: Final = 12

# ReadyForQuery transaction status bytes.
TXN_IDLE: Final = ord("I")
TXN_BLOCK: Final = ord("T")
TXN_FAILED: Final = ord("E")

# Limits.
MAX_STARTUP_PACKET: Final = 10_000  # Postgres's own MAX_STARTUP_PACKET_LENGTH
DEFAULT_MAX_MESSAGE: Final = 64 * 1024 * 1024
