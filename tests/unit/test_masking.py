"""Passwords never reach the output: ``leaseflow.local.shown`` on every URL and DSN form.

Examples pin the forms one by one; the properties generate passwords (any text) and
write them the ways a user may (raw or %-encoded in the user information, in a query
string, quoted or escaped in a libpq ``key=value`` string).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from urllib.parse import quote, quote_plus

import pytest
import sqlalchemy.exc
from click.testing import CliRunner
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from psycopg import conninfo
from sqlalchemy.engine import make_url

from leaseflow import cli, local, migrations
from leaseflow.settings import reset_settings

#: Any text but NUL (libpq cannot carry it) and lone surrogates (not encodable).
passwords = st.text(
    st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), min_size=1
)
#: No example database files in the work tree.
properties = settings(database=None, max_examples=300)


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("postgresql://u:pw@h/db", "postgresql://u:***@h/db"),
        (
            "postgresql+psycopg://u:pw@h:5432/db?sslmode=require",
            "postgresql+psycopg://u:***@h:5432/db?sslmode=require",
        ),
        ("amqp://guest:guest@localhost:5672//", "amqp://guest:***@localhost:5672//"),
        # an unencoded "@" (and "/", ":") in the password
        ("postgresql://u:p@ss@h/db", "postgresql://u:***@h/db"),
        ("postgresql://u:a/b:c@d@h:5432/db", "postgresql://u:***@h:5432/db"),
        # query strings
        ("postgresql://h/db?password=s3cret", "postgresql://h/db?password=***"),
        (
            "postgresql://u@h/db?sslmode=require&password=s3cret&x=1",
            "postgresql://u@h/db?sslmode=require&password=***&x=1",
        ),
        (
            "redis+socket:///run/redis.sock?PASSWORD=s3cret",
            "redis+socket:///run/redis.sock?PASSWORD=***",
        ),
        ("postgresql://h/db?sslpassword=k3y", "postgresql://h/db?sslpassword=***"),
        ("postgresql://h/db?pass%77ord=s3cret", "postgresql://h/db?pass%77ord=***"),
        (
            "jdbc:postgresql://h/db?user=u&password=s3cret",
            "jdbc:postgresql://h/db?user=u&password=***",
        ),
        # libpq key=value strings
        ("host=h password=s3cret dbname=x", "host=h password=*** dbname=x"),
        ("host=h password = 'se cr\\'et' dbname=x", "host=h password = *** dbname=x"),
        ("password=se\\ cret host=h", "password=*** host=h"),
        ("host=h sslpassword='k 3y'", "host=h sslpassword=***"),
        # nothing to hide
        (
            "redis+socket:///x/.leaseflow/redis/redis.sock",
            "redis+socket:///x/.leaseflow/redis/redis.sock",
        ),
        (
            "postgresql+psycopg://postgres@/leaseflow?host=/tmp/x",
            "postgresql+psycopg://postgres@/leaseflow?host=/tmp/x",
        ),
        (
            "host=/tmp/x dbname=leaseflow user=postgres",
            "host=/tmp/x dbname=leaseflow user=postgres",
        ),
    ],
)
def test_every_form_of_password_is_masked(url: str, expected: str):
    # When the URL or DSN is shown
    # Then its password, and only it, is masked
    assert local.shown(url) == expected


def test_a_password_in_the_query_with_an_at_sign_is_masked_whole():
    # Given a URL whose query password holds an unencoded "@" (parsers disagree here)
    url = "postgresql://u@h:5432/db?password=p@ss"
    # When it is shown
    out = local.shown(url)
    # Then no part of the password is left
    assert "p@ss" not in out and "ss" not in out
    assert out.startswith("postgresql://u@h:")


def test_a_driver_message_is_scrubbed_of_the_urls_password():
    # Given a driver's message that echoes the URL and its password, decoded
    url = "postgresql://u:p%40ss@h/db?sslpassword=k3y"
    message = f'missing "=" after "p@ss" in {url}; sslpassword k3y'
    # When it is scrubbed
    out = local.scrubbed(message, url)
    # Then neither password is left, in any form
    assert "p@ss" not in out and "p%40ss" not in out and "k3y" not in out
    assert "postgresql://u:***@h/db?sslpassword=***" in out


# -- properties --------------------------------------------------------------------


def _query_like(password: str) -> bool:
    """Would this password also read as a query parameter of its own ("&k=v")?"""
    return re.search(r"[?&][^&=?]*=", password) is not None


@properties
@given(password=passwords)
def test_a_raw_password_in_the_user_information_is_masked(password: str):
    # Given a URL with the password written as is, whatever it holds ("@", "/", ":", ...)
    assume(not _query_like(password))
    url = f"postgresql+psycopg://lf:{password}@db.example:5432/leaseflow?sslmode=require"
    # When it is shown
    out = local.shown(url)
    # Then exactly the password is masked
    assert out == "postgresql+psycopg://lf:***@db.example:5432/leaseflow?sslmode=require"


@properties
@given(password=passwords)
def test_an_encoded_password_in_the_user_information_is_masked(password: str):
    # Given a URL with the password %-encoded, as SQLAlchemy reads it
    url = f"redis://lf:{quote(password, safe='')}@cache.example:6379/0"
    assert make_url(url).password == password
    # When it is shown
    out = local.shown(url)
    # Then exactly the password is masked
    assert out == "redis://lf:***@cache.example:6379/0"


@properties
@given(password=passwords, plus=st.booleans())
def test_an_encoded_password_in_the_query_string_is_masked(password: str, plus: bool):
    # Given a URL with the password %-encoded in its query string
    encoded = quote_plus(password, safe="") if plus else quote(password, safe="")
    url = f"postgresql://lf@db.example:5432/leaseflow?sslmode=require&password={encoded}&x=1"
    assert make_url(url).query["password"] == password
    # When it is shown
    out = local.shown(url)
    # Then exactly the password is masked
    assert out == "postgresql://lf@db.example:5432/leaseflow?sslmode=require&password=***&x=1"


@properties
@given(password=passwords.filter(lambda p: "&" not in p and "*" not in p))
def test_a_raw_password_in_the_query_string_never_shows(password: str):
    # Given a URL with the password written as is in its query string ("@" included)
    template = "postgresql://lf@db.example:5432/leaseflow?sslmode=require&password={}&x=1"
    assume(password not in template.format("***"))  # not a piece of the URL itself
    # When it is shown
    out = local.shown(template.format(password))
    # Then the password is nowhere in it
    assert password not in out


@properties
@given(password=passwords)
def test_a_quoted_password_in_a_libpq_string_is_masked(password: str):
    # Given a libpq key=value string with the password quoted, as libpq reads it
    quoted = "'" + password.replace("\\", "\\\\").replace("'", "\\'") + "'"
    dsn = f"host=db.example port=5432 password={quoted} dbname=leaseflow"
    assert conninfo.conninfo_to_dict(dsn)["password"] == password
    # When it is shown
    out = local.shown(dsn)
    # Then exactly the password is masked
    assert out == "host=db.example port=5432 password=*** dbname=leaseflow"


@properties
@given(password=passwords)
def test_an_escaped_password_in_a_libpq_string_is_masked(password: str):
    # Given a libpq key=value string with the password unquoted, its blanks escaped
    # (libpq's blanks: ASCII only; any other space is part of the value)
    escaped = re.sub(r"([ \t\n\r\f\v\\])", r"\\\1", password)
    escaped = "\\" + escaped if escaped.startswith("'") else escaped
    dsn = f"host=db.example password={escaped} dbname=leaseflow"
    assert conninfo.conninfo_to_dict(dsn)["password"] == password
    # When it is shown
    out = local.shown(dsn)
    # Then exactly the password is masked
    assert out == "host=db.example password=*** dbname=leaseflow"


# -- where URLs are printed ----------------------------------------------------------


@pytest.fixture
def database_url(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A database URL with a password in its user information and in its query string."""
    for name in list(os.environ):
        if name.startswith("LEASEFLOW_"):
            monkeypatch.delenv(name)
    url = "postgresql+psycopg://lf:p@ss@db.example/app?sslmode=require&password=s3cret"
    monkeypatch.setenv("LEASEFLOW_DATABASE_URL", url)
    reset_settings()
    yield url
    reset_settings()


def test_db_upgrade_shows_the_database_without_its_passwords(
    database_url: str, monkeypatch: pytest.MonkeyPatch
):
    # Given a migration that succeeds (no database needed: the steps are stand-ins)
    revisions = iter([None, "r1"])
    monkeypatch.setattr(cli, "_revision", lambda url: next(revisions))
    monkeypatch.setattr(migrations, "upgrade", lambda url: None)
    # When `leaseflow db upgrade` runs
    result = CliRunner().invoke(cli.main, ["db", "upgrade"])
    # Then it names the database with both passwords masked
    assert result.exit_code == 0, result.output
    masked = "postgresql+psycopg://lf:***@db.example/app?sslmode=require&password=***"
    assert result.output == f"{masked}: upgraded from <empty> to revision r1\n"


def test_db_upgrade_errors_never_show_a_password(
    database_url: str, monkeypatch: pytest.MonkeyPatch
):
    # Given a driver error that echoes the passwords it was given
    def refused(url: str) -> None:
        echo = Exception('password "s3cret" (or "p@ss") rejected for "lf"')
        raise sqlalchemy.exc.OperationalError("connect", {}, echo)

    monkeypatch.setattr(cli, "_revision", refused)
    # When `leaseflow db upgrade` runs
    result = CliRunner().invoke(cli.main, ["db", "upgrade"])
    # Then it fails, naming the database and the error, without either password
    assert result.exit_code == 1
    assert "cannot migrate postgresql+psycopg://lf:***@db.example/" in result.output
    assert "rejected" in result.output
    assert "s3cret" not in result.output and "p@ss" not in result.output
