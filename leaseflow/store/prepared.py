"""The per-state statements (claim, fenced commit) through psycopg's libpq layer.

``Cursor.execute`` adds query conversion, adaptation and generator plumbing to
every statement: 0.105 ms of client CPU for a claim-shaped statement, 0.085 ms for
a commit-shaped one with 20 parameters, against 0.084 and 0.055 ms here (measured
on the 2-core benchmark machine, both prepared server-side). A :class:`Statement`
is prepared once per connection (named ``lf_<digest>``) and run through
``psycopg.pq``, psycopg's public libpq wrapper: parameters as text (``bytes`` as
binary), results in binary, the socket polled as psycopg polls it, so a signal
still interrupts the wait. Errors come out as psycopg's own exceptions
(``errors.error_from_result``), so callers treat them exactly as before.

Only the values those statements take are encoded: ``None``, ``bool``, ``int``,
``float``, ``str``, ``bytes``, ``datetime``, ``Jsonb``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import select
import struct
import uuid
import weakref
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
from psycopg import pq
from psycopg.types.json import Jsonb

_PLACEHOLDER = re.compile(r"%\((\w+)\)s")
_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)  # PostgreSQL's binary timestamp origin
_POLL_MS = 1000  # the longest wait between two looks at the socket (signals run)

#: The statements prepared on each connection: ``id(conn) -> (weakref to it, names)``.
_prepared: dict[int, tuple[weakref.ref[Any], set[bytes]]] = {}


def _names_prepared(conn: psycopg.Connection[Any]) -> set[bytes]:
    entry = _prepared.get(id(conn))
    if entry is None or entry[0]() is not conn:  # new, or another under a reused id
        entry = _prepared[id(conn)] = (weakref.ref(conn, _forget(id(conn))), set())
    return entry[1]


def _forget(key: int) -> Callable[[Any], None]:
    def forget(_ref: Any) -> None:
        _prepared.pop(key, None)

    return forget


def _int(data: bytes) -> int:
    return int.from_bytes(data, "big", signed=True)


def _timestamptz(data: bytes) -> datetime:
    return _EPOCH + timedelta(microseconds=struct.unpack("!q", data)[0])


#: Binary result decoders by type oid.
DECODERS: dict[int, Callable[[bytes], Any]] = {
    16: lambda b: b == b"\x01",  # bool
    17: bytes,  # bytea
    20: _int,  # int8
    21: _int,  # int2
    23: _int,  # int4
    25: lambda b: b.decode(),  # text
    1184: _timestamptz,
    2950: lambda b: str(uuid.UUID(bytes=b)),
    3802: lambda b: json.loads(b[1:]),  # jsonb: a version byte, then the text
}


def _text(value: str) -> tuple[bytes, int]:
    if "\x00" in value:  # libpq would cut the text there: refuse it, as psycopg does
        raise psycopg.DataError("PostgreSQL text fields cannot contain NUL (0x00) bytes")
    return value.encode(), 0


#: Parameter encoders by exact type: ``(data, format)``, text but ``bytes`` binary.
ENCODERS: dict[type, Callable[[Any], tuple[bytes | None, int]]] = {
    type(None): lambda v: (None, 0),
    str: _text,
    bool: lambda v: (b"t" if v else b"f", 0),
    int: lambda v: (b"%d" % v, 0),
    float: lambda v: (repr(v).encode(), 0),
    bytes: lambda v: (v, 1),
    datetime: lambda v: (v.isoformat().encode(), 0),
    Jsonb: lambda v: (json.dumps(v.obj).encode(), 0),
}


def _encode(value: Any) -> tuple[bytes | None, int]:
    """A value of a subclass (a ``StrEnum``, an ``IntEnum``) as its base type's."""
    for kind, encode in ENCODERS.items():
        if isinstance(value, kind):
            return encode(str.__str__(value) if kind is str else value)
    raise TypeError(f"cannot send a {type(value).__name__} to a prepared statement")


class Statement:
    """One SQL statement with ``%(name)s`` parameters, run prepared (see the module)."""

    def __init__(self, sql: str) -> None:
        names: list[str] = []

        def number(m: re.Match[str]) -> str:
            if m.group(1) not in names:
                names.append(m.group(1))
            return f"${names.index(m.group(1)) + 1}"

        self.sql = _PLACEHOLDER.sub(number, sql).replace("%%", "%").encode()
        self.names = tuple(names)
        self.name = b"lf_" + hashlib.sha1(self.sql).hexdigest()[:16].encode()

    def one(
        self, conn: psycopg.Connection[Any], params: Mapping[str, Any]
    ) -> tuple[Any, ...] | None:
        """Run on ``conn``: the first row, or None for no row.

        On an idle (autocommit) connection the statement runs prepared under its name,
        prepared again if the server forgot it (psycopg sends ``DEALLOCATE ALL`` after
        a rollback). Inside a transaction it runs unnamed: a missing name there would
        abort the transaction."""
        pgconn = conn.pgconn
        values, formats = [], []
        for name in self.names:
            value = params[name]
            encode = ENCODERS.get(type(value)) or _encode
            data, fmt = encode(value)
            values.append(data)
            formats.append(fmt)
        if pgconn.transaction_status != pq.TransactionStatus.IDLE:
            pgconn.send_query_params(self.sql, values, None, formats, result_format=1)
            return _first_row(_check(conn, _wait(pgconn)))
        done = _names_prepared(conn)
        for retry in (True, False):
            if self.name not in done:
                pgconn.send_prepare(self.name, self.sql)
                _check(conn, _wait(pgconn))
                done.add(self.name)
            pgconn.send_query_prepared(self.name, values, formats, result_format=1)
            try:
                return _first_row(_check(conn, _wait(pgconn)))
            except psycopg.errors.InvalidSqlStatementName:
                if not retry:
                    raise
                done.clear()  # deallocated behind our back: prepare again, once
        raise AssertionError("unreachable")


def _first_row(result: pq.abc.PGresult) -> tuple[Any, ...] | None:
    """The first row of ``result`` (binary), decoded; None when it has none."""
    if not result.ntuples:
        return None
    row = []
    for i in range(result.nfields):
        data = result.get_value(0, i)
        row.append(None if data is None else DECODERS[result.ftype(i)](data))
    return tuple(row)


@functools.cache
def statement(sql: str) -> Statement:
    """The :class:`Statement` of ``sql`` (one per text)."""
    return Statement(sql)


def _wait(pgconn: pq.abc.PGconn) -> pq.abc.PGresult:
    """The result of the query just sent (the last one, as psycopg keeps)."""
    while pgconn.flush():
        select.select([], [pgconn.socket], [], _POLL_MS / 1000)
    pgconn.consume_input()
    if pgconn.is_busy():
        poller = select.poll()
        poller.register(pgconn.socket, select.POLLIN)
        while True:
            poller.poll(_POLL_MS)
            pgconn.consume_input()
            if not pgconn.is_busy():
                break
    result = last = pgconn.get_result()
    while last is not None:
        result, last = last, pgconn.get_result()
    if result is None:
        raise psycopg.OperationalError("the server sent no result")
    return result


_OK = (pq.ExecStatus.TUPLES_OK.value, pq.ExecStatus.COMMAND_OK.value)


def _check(conn: psycopg.Connection[Any], result: pq.abc.PGresult) -> pq.abc.PGresult:
    """``result`` unless it is an error: then psycopg's exception for it."""
    if result.status in _OK:
        return result
    if conn.pgconn.status == pq.ConnStatus.BAD:
        raise psycopg.OperationalError(conn.pgconn.error_message.decode(errors="replace"))
    raise psycopg.errors.error_from_result(result, encoding=conn.info.encoding)
