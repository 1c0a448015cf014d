"""Prepared statements through libpq (``store.prepared``): the same values, errors and
exceptions as a psycopg cursor, one ``PREPARE`` per connection."""

from __future__ import annotations

import enum
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg.types.json import Jsonb

from leaseflow.store import prepared


@pytest.fixture
def conn(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """A connection of its own, in a time zone other than UTC (psycopg reads in it)."""
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as c:
        c.execute("SET TimeZone TO 'Asia/Kolkata'")
        yield c


def _via_cursor(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any]) -> Any:
    row = conn.execute(sql, params).fetchone()
    return None if row is None else tuple(row)


def _ours(conn: psycopg.Connection[Any]) -> list[str]:
    rows = conn.execute("SELECT name FROM pg_prepared_statements WHERE name LIKE 'lf\\_%'")
    return [name for (name,) in rows]


AWARE = datetime(2024, 2, 29, 23, 59, 58, 123456, tzinfo=timezone(timedelta(hours=-5)))

# (value, SQL type): every kind of value the encoders take, and every decoded type
CASES = [
    (None, "text"),
    ("héllo, 'world' %s", "text"),
    ("", "text"),
    (True, "bool"),
    (False, "bool"),
    (-(2**15), "int2"),
    (2**31 - 1, "int4"),
    (-(2**63), "int8"),
    (0.1, "float8::text"),  # float8 is sent, not decoded: compared as text
    (-1e300, "float8::text"),
    (float("inf"), "float8::text"),
    (b"\x00\xffbin\x00", "bytea"),
    (b"", "bytea"),
    (AWARE, "timestamptz"),
    (datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC), "timestamptz"),
    (datetime(2024, 1, 1, 12, 0), "timestamptz"),  # naive: the session's time zone
    ("0b6c2d6e-56a4-4b32-9a77-4b9c1f8e0a11", "uuid"),
    (Jsonb({"a": [1, 2.5, None, True], "b": {"ü": "\u2603"}}), "jsonb"),
    (Jsonb([]), "jsonb"),
]


@pytest.mark.parametrize(("value", "pgtype"), CASES, ids=lambda c: repr(c)[:30])
def test_a_value_comes_back_as_a_psycopg_cursor_returns_it(conn, value, pgtype):
    sql = f"SELECT %(x)s::{pgtype}"
    # When the same query runs prepared and through a cursor
    [ours] = prepared.Statement(sql).one(conn, {"x": value})
    [theirs] = _via_cursor(conn, sql, {"x": value})
    # Then both read the same value (a uuid as its text)
    assert ours == (str(theirs) if pgtype == "uuid" else theirs)
    assert type(ours) is (str if pgtype == "uuid" else type(theirs))
    if isinstance(ours, datetime):
        assert ours.utcoffset() is not None  # aware, in UTC
    if isinstance(value, Jsonb):
        assert ours == value.obj


def test_enum_members_are_sent_as_their_values(conn):
    class Colour(enum.StrEnum):
        RED = "red"

    class Size(enum.IntEnum):
        BIG = 7

    row = prepared.Statement("SELECT %(c)s::text, %(s)s::int4").one(
        conn, {"c": Colour.RED, "s": Size.BIG}
    )
    assert row == ("red", 7)


def test_a_name_used_twice_is_one_parameter_and_no_row_is_none(conn):
    st = prepared.Statement("SELECT %(x)s::int4 + %(x)s::int4, '100%%', %(y)s::text")
    assert st.names == ("x", "y")
    assert st.one(conn, {"x": 20, "y": "z"}) == (40, "100%", "z")
    assert prepared.Statement("SELECT 1 WHERE %(x)s::bool").one(conn, {"x": False}) is None


def test_a_statement_is_prepared_once_per_connection(conn, database_url):
    st = prepared.statement("SELECT %(x)s::int8 * 2")
    assert prepared.statement("SELECT %(x)s::int8 * 2") is st  # cached by text
    # When it runs twice on a connection
    assert st.one(conn, {"x": 1}) == (2,)
    assert st.one(conn, {"x": 2}) == (4,)
    # Then that connection prepared it once
    assert _ours(conn) == [st.name.decode()]
    # And a new connection prepares it again
    with psycopg.connect(database_url.replace("+psycopg", ""), autocommit=True) as other:
        assert _ours(other) == []
        assert st.one(other, {"x": 3}) == (6,)
        assert _ours(other) == [st.name.decode()]


def test_inside_a_transaction_a_statement_runs_unnamed(conn):
    st = prepared.Statement("SELECT 10 / %(n)s::int4")
    # Given a statement run inside a transaction that fails, then one that commits
    with pytest.raises(psycopg.errors.DivisionByZero), conn.transaction():
        st.one(conn, {"n": 0})
    with conn.transaction():
        assert st.one(conn, {"n": 2}) == (5,)
    # Then nothing was prepared (a name missing there would abort the transaction)
    assert _ours(conn) == []
    assert st.one(conn, {"n": 5}) == (2,)  # idle: prepared now
    assert _ours(conn) == [st.name.decode()]


def test_a_statement_deallocated_behind_its_back_is_prepared_again(conn):
    st = prepared.Statement("SELECT %(n)s::int4 + 1")
    assert st.one(conn, {"n": 1}) == (2,)
    # When the session's statements are dropped (psycopg does after a rollback)
    conn.execute("DEALLOCATE ALL")
    # Then the next run prepares it again, once
    assert st.one(conn, {"n": 2}) == (3,)
    assert _ours(conn) == [st.name.decode()]


def test_a_server_error_is_psycopgs_exception_and_the_connection_lives_on(conn):
    conn.execute("CREATE TABLE t (n int CONSTRAINT n_positive CHECK (n > 0))")
    insert = prepared.Statement("INSERT INTO t VALUES (%(n)s) RETURNING n")
    # When a statement breaks a CHECK, or divides by zero
    with pytest.raises(psycopg.errors.CheckViolation) as check:
        insert.one(conn, {"n": -1})
    with pytest.raises(psycopg.errors.DivisionByZero) as zero:
        prepared.Statement("SELECT 1 / %(n)s::int4").one(conn, {"n": 0})
    # Then the exception is psycopg's own, with its diagnostics
    assert check.value.diag.constraint_name == "n_positive"
    assert check.value.sqlstate == "23514"
    assert zero.value.diag.message_primary == "division by zero"
    # And the connection goes on: nothing was left half done
    assert insert.one(conn, {"n": 1}) == (1,)
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert _via_cursor(conn, "SELECT count(*) FROM t", {}) == (1,)


def test_a_prepare_error_is_raised_and_not_remembered(conn):
    st = prepared.Statement("SELECT n FROM later WHERE n = %(n)s")
    with pytest.raises(psycopg.errors.UndefinedTable):
        st.one(conn, {"n": 1})
    conn.execute("CREATE TABLE later (n int)")
    conn.execute("INSERT INTO later VALUES (1)")
    assert st.one(conn, {"n": 1}) == (1,)


def test_a_terminated_backend_is_an_operational_error(conn, db):
    st = prepared.Statement("SELECT %(x)s::int4")
    assert st.one(conn, {"x": 1}) == (1,)
    # Given the connection's backend was terminated from another connection
    db.execute("SELECT pg_terminate_backend(%s)", (conn.info.backend_pid,))
    # When a statement runs on it
    with pytest.raises(psycopg.OperationalError):
        st.one(conn, {"x": 2})
    # Then psycopg sees it broken too (the store replaces such a connection)
    assert conn.broken


def test_a_refused_value_is_not_sent(conn):
    conn.execute("CREATE TABLE t (a text, b text)")
    insert = prepared.Statement("INSERT INTO t VALUES (%(a)s, %(b)s) RETURNING a")
    # When a value is a str with NUL, or of a type no encoder takes
    with pytest.raises(psycopg.DataError, match="NUL"):
        insert.one(conn, {"a": "first", "b": "nul\x00inside"})
    with pytest.raises(TypeError, match="Decimal"):
        insert.one(conn, {"a": "first", "b": Decimal("1.5")})
    # Then nothing ran, and the connection runs the next statement
    assert conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    assert _via_cursor(conn, "SELECT count(*) FROM t", {}) == (0,)
    assert insert.one(conn, {"a": "ok", "b": None}) == ("ok",)
