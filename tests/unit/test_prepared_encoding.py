"""What ``store.prepared`` sends and reads, without a server: parameters as text
(``bytes`` as binary), binary results, ``%(name)s`` placeholders as ``$n``."""

from __future__ import annotations

import enum
import struct
import uuid
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal

import psycopg
import pytest
from psycopg.types.json import Jsonb

from leaseflow.store import prepared


class Colour(enum.StrEnum):
    RED = "red"


class Size(enum.IntEnum):
    BIG = 7


class Tag(str):
    pass


class Legacy(str, enum.Enum):  # noqa: UP042  (the older spelling: its str() is "Legacy.OLD")
    OLD = "old"


@pytest.mark.parametrize(
    ("value", "sent"),
    [
        (None, (None, 0)),
        ("héllo", ("héllo".encode(), 0)),
        (True, (b"t", 0)),
        (False, (b"f", 0)),
        (-42, (b"-42", 0)),
        (2**70, (b"%d" % 2**70, 0)),
        (0.1, (b"0.1", 0)),
        (b"\x00\xff", (b"\x00\xff", 1)),
        (
            datetime(2024, 1, 2, 3, 4, 5, 6, tzinfo=timezone(timedelta(hours=2))),
            (b"2024-01-02T03:04:05.000006+02:00", 0),
        ),
        (Jsonb({"a": [1, None]}), (b'{"a": [1, null]}', 0)),
        (Colour.RED, (b"red", 0)),
        (Legacy.OLD, (b"old", 0)),
        (Size.BIG, (b"7", 0)),
    ],
    ids=repr,
)
def test_each_value_is_sent_as_postgresql_reads_it(value, sent):
    assert prepared._encode(value) == sent


def test_a_nul_in_text_and_an_unknown_type_are_refused():
    with pytest.raises(psycopg.DataError):
        prepared._encode("a\x00b")
    with pytest.raises(psycopg.DataError):
        prepared._encode(Tag("a\x00b"))
    for value in (Decimal("1"), date(2024, 1, 1), [1], {"a": 1}):
        with pytest.raises(TypeError, match=type(value).__name__):
            prepared._encode(value)


@pytest.mark.parametrize(
    ("oid", "data", "value"),
    [
        (16, b"\x01", True),
        (16, b"\x00", False),
        (17, b"\x00raw", b"\x00raw"),
        (21, b"\xff\xfe", -2),
        (23, struct.pack("!i", 2**31 - 1), 2**31 - 1),
        (20, struct.pack("!q", -(2**63)), -(2**63)),
        (25, "ünï".encode(), "ünï"),
        (1184, struct.pack("!q", 0), datetime(2000, 1, 1, tzinfo=UTC)),
        (1184, struct.pack("!q", -1), datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)),
        (2950, uuid.UUID(int=1).bytes, "00000000-0000-0000-0000-000000000001"),
        (3802, b'\x01{"a": [1, 2.5]}', {"a": [1, 2.5]}),
    ],
)
def test_each_binary_result_is_read_as_psycopg_returns_it(oid, data, value):
    assert prepared.DECODERS[oid](data) == value


def test_placeholders_become_numbered_parameters_once_per_name():
    st = prepared.Statement("SELECT %(a)s, %(b)s, %(a)s WHERE x LIKE 'a%%'")
    assert st.sql == b"SELECT $1, $2, $1 WHERE x LIKE 'a%'"
    assert st.names == ("a", "b")
    # The name is the statement's digest: the same text, the same name
    assert st.name.startswith(b"lf_") and len(st.name) == 19
    assert prepared.Statement("SELECT %(a)s, %(b)s, %(a)s WHERE x LIKE 'a%%'").name == st.name
    assert prepared.Statement("SELECT %(b)s").name != st.name
