from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERACTIVE: _ClassVar[Priority]
    BATCH: _ClassVar[Priority]

class ResultFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TYPED: _ClassVar[ResultFormat]
    WIRE: _ClassVar[ResultFormat]

class Served(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVED_UNSPECIFIED: _ClassVar[Served]
    EXECUTED: _ClassVar[Served]
    CACHE_HIT: _ClassVar[Served]
    COALESCED: _ClassVar[Served]
    BATCHED: _ClassVar[Served]
INTERACTIVE: Priority
BATCH: Priority
TYPED: ResultFormat
WIRE: ResultFormat
SERVED_UNSPECIFIED: Served
EXECUTED: Served
CACHE_HIT: Served
COALESCED: Served
BATCHED: Served

class Value(_message.Message):
    __slots__ = ("null", "bool", "int64", "double", "numeric", "text", "bytea", "date", "time", "timestamp", "timestamptz", "interval", "uuid", "json", "array", "other")
    NULL_FIELD_NUMBER: _ClassVar[int]
    BOOL_FIELD_NUMBER: _ClassVar[int]
    INT64_FIELD_NUMBER: _ClassVar[int]
    DOUBLE_FIELD_NUMBER: _ClassVar[int]
    NUMERIC_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BYTEA_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMPTZ_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    JSON_FIELD_NUMBER: _ClassVar[int]
    ARRAY_FIELD_NUMBER: _ClassVar[int]
    OTHER_FIELD_NUMBER: _ClassVar[int]
    null: bool
    bool: bool
    int64: int
    double: float
    numeric: str
    text: str
    bytea: bytes
    date: str
    time: str
    timestamp: str
    timestamptz: str
    interval: str
    uuid: str
    json: str
    array: Array
    other: Other
    def __init__(self, null: _Optional[bool] = ..., bool: _Optional[bool] = ..., int64: _Optional[int] = ..., double: _Optional[float] = ..., numeric: _Optional[str] = ..., text: _Optional[str] = ..., bytea: _Optional[bytes] = ..., date: _Optional[str] = ..., time: _Optional[str] = ..., timestamp: _Optional[str] = ..., timestamptz: _Optional[str] = ..., interval: _Optional[str] = ..., uuid: _Optional[str] = ..., json: _Optional[str] = ..., array: _Optional[_Union[Array, _Mapping]] = ..., other: _Optional[_Union[Other, _Mapping]] = ...) -> None: ...

class Array(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class Other(_message.Message):
    __slots__ = ("type_name", "text")
    TYPE_NAME_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    type_name: str
    text: str
    def __init__(self, type_name: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class Hints(_message.Message):
    __slots__ = ("max_staleness_seconds", "max_rows", "timeout_seconds", "priority")
    MAX_STALENESS_SECONDS_FIELD_NUMBER: _ClassVar[int]
    MAX_ROWS_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    max_staleness_seconds: float
    max_rows: int
    timeout_seconds: float
    priority: Priority
    def __init__(self, max_staleness_seconds: _Optional[float] = ..., max_rows: _Optional[int] = ..., timeout_seconds: _Optional[float] = ..., priority: _Optional[_Union[Priority, str]] = ...) -> None: ...

class QueryRequest(_message.Message):
    __slots__ = ("sql", "params", "database", "hints", "idempotency_key", "format")
    SQL_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    HINTS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    sql: str
    params: _containers.RepeatedCompositeFieldContainer[Value]
    database: str
    hints: Hints
    idempotency_key: str
    format: ResultFormat
    def __init__(self, sql: _Optional[str] = ..., params: _Optional[_Iterable[_Union[Value, _Mapping]]] = ..., database: _Optional[str] = ..., hints: _Optional[_Union[Hints, _Mapping]] = ..., idempotency_key: _Optional[str] = ..., format: _Optional[_Union[ResultFormat, str]] = ...) -> None: ...

class Column(_message.Message):
    __slots__ = ("name", "type_oid", "type_name")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TYPE_OID_FIELD_NUMBER: _ClassVar[int]
    TYPE_NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    type_oid: int
    type_name: str
    def __init__(self, name: _Optional[str] = ..., type_oid: _Optional[int] = ..., type_name: _Optional[str] = ...) -> None: ...

class Row(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedCompositeFieldContainer[Value]
    def __init__(self, values: _Optional[_Iterable[_Union[Value, _Mapping]]] = ...) -> None: ...

class QueryResponse(_message.Message):
    __slots__ = ("columns", "rows", "command_tag", "rows_affected", "served", "elapsed_ms", "fingerprint", "truncated", "wire")
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_TAG_FIELD_NUMBER: _ClassVar[int]
    ROWS_AFFECTED_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_MS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    WIRE_FIELD_NUMBER: _ClassVar[int]
    columns: _containers.RepeatedCompositeFieldContainer[Column]
    rows: _containers.RepeatedCompositeFieldContainer[Row]
    command_tag: str
    rows_affected: int
    served: Served
    elapsed_ms: float
    fingerprint: str
    truncated: bool
    wire: bytes
    def __init__(self, columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[Row, _Mapping]]] = ..., command_tag: _Optional[str] = ..., rows_affected: _Optional[int] = ..., served: _Optional[_Union[Served, str]] = ..., elapsed_ms: _Optional[float] = ..., fingerprint: _Optional[str] = ..., truncated: _Optional[bool] = ..., wire: _Optional[bytes] = ...) -> None: ...

class Error(_message.Message):
    __slots__ = ("sqlstate", "message", "detail", "hint", "position", "status_code")
    SQLSTATE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    HINT_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    STATUS_CODE_FIELD_NUMBER: _ClassVar[int]
    sqlstate: str
    message: str
    detail: str
    hint: str
    position: str
    status_code: int
    def __init__(self, sqlstate: _Optional[str] = ..., message: _Optional[str] = ..., detail: _Optional[str] = ..., hint: _Optional[str] = ..., position: _Optional[str] = ..., status_code: _Optional[int] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("id", "query")
    ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_FIELD_NUMBER: _ClassVar[int]
    id: int
    query: QueryRequest
    def __init__(self, id: _Optional[int] = ..., query: _Optional[_Union[QueryRequest, _Mapping]] = ...) -> None: ...

class SessionReply(_message.Message):
    __slots__ = ("id", "result", "error")
    ID_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    id: int
    result: QueryResponse
    error: Error
    def __init__(self, id: _Optional[int] = ..., result: _Optional[_Union[QueryResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class BatchRequest(_message.Message):
    __slots__ = ("statements", "transaction", "database")
    STATEMENTS_FIELD_NUMBER: _ClassVar[int]
    TRANSACTION_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    statements: _containers.RepeatedCompositeFieldContainer[QueryRequest]
    transaction: bool
    database: str
    def __init__(self, statements: _Optional[_Iterable[_Union[QueryRequest, _Mapping]]] = ..., transaction: _Optional[bool] = ..., database: _Optional[str] = ...) -> None: ...

class BatchItem(_message.Message):
    __slots__ = ("result", "error")
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    result: QueryResponse
    error: Error
    def __init__(self, result: _Optional[_Union[QueryResponse, _Mapping]] = ..., error: _Optional[_Union[Error, _Mapping]] = ...) -> None: ...

class BatchResponse(_message.Message):
    __slots__ = ("items", "committed")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[BatchItem]
    committed: bool
    def __init__(self, items: _Optional[_Iterable[_Union[BatchItem, _Mapping]]] = ..., committed: _Optional[bool] = ...) -> None: ...

class QueryChunk(_message.Message):
    __slots__ = ("columns", "rows", "command_tag", "served")
    COLUMNS_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COMMAND_TAG_FIELD_NUMBER: _ClassVar[int]
    SERVED_FIELD_NUMBER: _ClassVar[int]
    columns: _containers.RepeatedCompositeFieldContainer[Column]
    rows: _containers.RepeatedCompositeFieldContainer[Row]
    command_tag: str
    served: Served
    def __init__(self, columns: _Optional[_Iterable[_Union[Column, _Mapping]]] = ..., rows: _Optional[_Iterable[_Union[Row, _Mapping]]] = ..., command_tag: _Optional[str] = ..., served: _Optional[_Union[Served, str]] = ...) -> None: ...

class ExplainRequest(_message.Message):
    __slots__ = ("sql", "database", "postgres_explain")
    SQL_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    POSTGRES_EXPLAIN_FIELD_NUMBER: _ClassVar[int]
    sql: str
    database: str
    postgres_explain: bool
    def __init__(self, sql: _Optional[str] = ..., database: _Optional[str] = ..., postgres_explain: _Optional[bool] = ...) -> None: ...

class ExplainResponse(_message.Message):
    __slots__ = ("fingerprint", "canonical_sql", "kind", "cacheable", "why_not", "tables_read", "tables_written", "verdict", "text", "postgres_plan_json")
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    CANONICAL_SQL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CACHEABLE_FIELD_NUMBER: _ClassVar[int]
    WHY_NOT_FIELD_NUMBER: _ClassVar[int]
    TABLES_READ_FIELD_NUMBER: _ClassVar[int]
    TABLES_WRITTEN_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    POSTGRES_PLAN_JSON_FIELD_NUMBER: _ClassVar[int]
    fingerprint: str
    canonical_sql: str
    kind: str
    cacheable: bool
    why_not: str
    tables_read: _containers.RepeatedScalarFieldContainer[str]
    tables_written: _containers.RepeatedScalarFieldContainer[str]
    verdict: str
    text: str
    postgres_plan_json: str
    def __init__(self, fingerprint: _Optional[str] = ..., canonical_sql: _Optional[str] = ..., kind: _Optional[str] = ..., cacheable: _Optional[bool] = ..., why_not: _Optional[str] = ..., tables_read: _Optional[_Iterable[str]] = ..., tables_written: _Optional[_Iterable[str]] = ..., verdict: _Optional[str] = ..., text: _Optional[str] = ..., postgres_plan_json: _Optional[str] = ...) -> None: ...

class InvalidateRequest(_message.Message):
    __slots__ = ("tables", "database")
    TABLES_FIELD_NUMBER: _ClassVar[int]
    DATABASE_FIELD_NUMBER: _ClassVar[int]
    tables: _containers.RepeatedScalarFieldContainer[str]
    database: str
    def __init__(self, tables: _Optional[_Iterable[str]] = ..., database: _Optional[str] = ...) -> None: ...

class InvalidateResponse(_message.Message):
    __slots__ = ("tables",)
    TABLES_FIELD_NUMBER: _ClassVar[int]
    tables: int
    def __init__(self, tables: _Optional[int] = ...) -> None: ...

class StatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class AgentStats(_message.Message):
    __slots__ = ("agent", "queries", "hits", "coalesced", "misses", "bypassed", "rejected", "p50_ms", "p99_ms")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    QUERIES_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    COALESCED_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    BYPASSED_FIELD_NUMBER: _ClassVar[int]
    REJECTED_FIELD_NUMBER: _ClassVar[int]
    P50_MS_FIELD_NUMBER: _ClassVar[int]
    P99_MS_FIELD_NUMBER: _ClassVar[int]
    agent: str
    queries: int
    hits: int
    coalesced: int
    misses: int
    bypassed: int
    rejected: int
    p50_ms: float
    p99_ms: float
    def __init__(self, agent: _Optional[str] = ..., queries: _Optional[int] = ..., hits: _Optional[int] = ..., coalesced: _Optional[int] = ..., misses: _Optional[int] = ..., bypassed: _Optional[int] = ..., rejected: _Optional[int] = ..., p50_ms: _Optional[float] = ..., p99_ms: _Optional[float] = ...) -> None: ...

class StatsResponse(_message.Message):
    __slots__ = ("agents", "upstream_queries", "cache_hits", "cache_entries", "cache_bytes")
    AGENTS_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_QUERIES_FIELD_NUMBER: _ClassVar[int]
    CACHE_HITS_FIELD_NUMBER: _ClassVar[int]
    CACHE_ENTRIES_FIELD_NUMBER: _ClassVar[int]
    CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    agents: _containers.RepeatedCompositeFieldContainer[AgentStats]
    upstream_queries: int
    cache_hits: int
    cache_entries: int
    cache_bytes: int
    def __init__(self, agents: _Optional[_Iterable[_Union[AgentStats, _Mapping]]] = ..., upstream_queries: _Optional[int] = ..., cache_hits: _Optional[int] = ..., cache_entries: _Optional[int] = ..., cache_bytes: _Optional[int] = ...) -> None: ...
