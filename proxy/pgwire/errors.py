"""Protocol errors and the SQLSTATE codes pgsluice itself raises.

A ProtocolError always carries the SQLSTATE the client should see; the codec
raises nothing else on bad input (fuzzed in tests/test_pgwire_fuzz.py).
"""

from typing import Final

PROTOCOL_VIOLATION: Final = "08P01"
CONNECTION_FAILURE: Final = "08006"
UNABLE_TO_CONNECT: Final = "08001"
CONNECTION_EXCEPTION: Final = "08000"
TOO_MANY_CONNECTIONS: Final = "53300"
INVALID_AUTHORIZATION: Final = "28000"
INVALID_PASSWORD: Final = "28P01"
INVALID_CATALOG_NAME: Final = "3D000"
FEATURE_NOT_SUPPORTED: Final = "0A000"
ADMIN_SHUTDOWN: Final = "57P01"
QUERY_CANCELED: Final = "57014"
INTERNAL_ERROR: Final = "XX000"
INSUFFICIENT_PRIVILEGE: Final = "42501"
CANNOT_CONNECT_NOW: Final = "57P03"
IDLE_IN_TRANSACTION_TIMEOUT: Final = "25P03"


class ProtocolError(Exception):
    """Bad bytes from a peer: answer with an ErrorResponse carrying `sqlstate`, then close."""

    def __init__(self, message: str, sqlstate: str = PROTOCOL_VIOLATION) -> None:
        super().__init__(message)
        self.message = message
        self.sqlstate = sqlstate


class PgError(Exception):
    """An error with a SQLSTATE that pgsluice reports to a client as an ErrorResponse."""

    def __init__(self, sqlstate: str, message: str, *, severity: str = "ERROR",
                 detail: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.severity = severity
        self.detail = detail
        self.hint = hint
