"""Which database and broker the settings mean, and what children are told (no server).

The embedded PostgreSQL and Redis themselves are exercised in ``test_embedded.py``;
here fake ``ensure_server`` functions stand in for them, so every test is pure and fast.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from leaseflow import errors, local
from leaseflow.local import broker, pgctl, postgres, redis, redisctl, resolution, system
from leaseflow.settings import Settings, get_settings, reset_settings

EXPLICIT_DB = "postgresql+psycopg://u@db/x"
EXPLICIT_BROKER = "redis://r:6379/0"


def sock_url(home: Path) -> str:
    """The embedded Redis's URL for a home short enough to hold its socket."""
    return f"redis+socket://{home}/redis/redis.sock"


@pytest.fixture(autouse=True)
def no_leaseflow_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No ``LEASEFLOW_*`` variable of the caller leaks in; the settings cache is fresh."""
    for name in list(os.environ):
        if name.startswith("LEASEFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    reset_settings()
    yield
    reset_settings()


@pytest.fixture
def fake_server(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """``ensure_server`` returns a made-up server and records the homes it was asked for."""
    asked: list[Path] = []

    def ensure_server(home: Path) -> local.Server:
        asked.append(home)
        url = f"postgresql+psycopg://postgres@/leaseflow?host={home / 'pgdata'}"
        server = local.Server(home, home / "pgdata", url, 4242, "18.1", os.getpid())
        monkeypatch.setitem(postgres._servers, home, server)
        return server

    monkeypatch.setattr(postgres, "ensure_server", ensure_server)
    monkeypatch.setattr(resolution, "_announced", False)
    return asked


@pytest.fixture
def fake_redis(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """The embedded Redis's ``ensure_server``, made up likewise."""
    asked: list[Path] = []

    def ensure_server(home: Path) -> local.RedisServer:
        asked.append(home)
        sock = home / "redis" / "redis.sock"
        server = local.RedisServer(
            home, home / "redis", sock, sock_url(home), 4343, "6.2.14", os.getpid()
        )
        monkeypatch.setitem(redis._servers, home, server)
        return server

    monkeypatch.setattr(redis, "ensure_server", ensure_server)
    monkeypatch.setattr(resolution, "_announced", False)
    return asked


def defaults(home: Path, **values: object) -> Settings:
    return Settings(home=home, database_url=None, broker_url=None, **values)


# -- the decision ----------------------------------------------------------------------


def test_no_urls_mean_the_embedded_database_and_the_embedded_redis_of_the_home(
    tmp_path: Path,
):
    choice = local.choose(defaults(tmp_path / "h"), environ={})
    assert choice == local.Choice(sock_url(tmp_path / "h"), tmp_path / "h", tmp_path / "h")
    assert not (tmp_path / "h").exists()  # deciding touches nothing


def test_a_relative_home_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.chdir(tmp_path)
    choice = local.choose(defaults(Path(".leaseflow")), environ={})
    assert choice.embedded_home == choice.broker_home == tmp_path / ".leaseflow"
    assert choice.broker_url == sock_url(tmp_path / ".leaseflow")


def test_explicit_urls_are_kept(tmp_path: Path):
    settings = defaults(tmp_path).model_copy(
        update={"database_url": EXPLICIT_DB, "broker_url": EXPLICIT_BROKER}
    )
    assert local.choose(settings, environ={}) == local.Choice(EXPLICIT_BROKER, None, None)


def test_without_database_only_the_broker_is_decided(tmp_path: Path):
    choice = local.choose(defaults(tmp_path), database=False, environ={})
    assert (choice.embedded_home, choice.broker_home) == (None, tmp_path)


@pytest.mark.parametrize(
    "given",
    ["", "redis+socket://", "redis+socket:///", "redis+socket:", "filesystem://", "filesystem:"],
)
def test_a_bare_default_url_means_the_home_redis(tmp_path: Path, given: str):
    settings = defaults(tmp_path).model_copy(update={"broker_url": given})
    assert local.broker_url(settings) == sock_url(tmp_path)
    assert local.choose(settings, environ={}).broker_home == tmp_path


def test_a_directory_of_the_removed_filesystem_broker_is_refused(tmp_path: Path):
    settings = defaults(tmp_path).model_copy(update={"broker_url": "filesystem:///x/broker"})
    with pytest.raises(errors.ConfigurationError, match="filesystem broker is gone"):
        local.broker_url(settings)


def test_the_broker_url_a_parent_marked_as_embedded_means_the_embedded_redis(tmp_path: Path):
    # Given a broker URL that a parent exported as its embedded Redis's
    url = sock_url(tmp_path)
    settings = defaults(tmp_path).model_copy(update={"broker_url": url})
    # Then this process registers with that server; any other URL is a foreign broker
    marked = {local.ENV_EMBEDDED_BROKER_URL: url}
    assert local.choose(settings, environ=marked).broker_home == tmp_path
    assert local.choose(settings, environ={}).broker_home is None
    other = {local.ENV_EMBEDDED_BROKER_URL: "redis+socket:///else/redis.sock"}
    assert local.choose(settings, environ=other).broker_home is None
    assert local.choose(settings, environ=marked).broker_url == url


def test_the_url_a_parent_marked_as_embedded_means_the_embedded_server(tmp_path: Path):
    # Given a database URL that a parent exported as its embedded server's
    url = f"postgresql+psycopg://postgres@/leaseflow?host={tmp_path}/pgdata"
    settings = defaults(tmp_path).model_copy(update={"database_url": url})
    # Then this process registers with that server; any other URL is a foreign database
    marked = {local.ENV_EMBEDDED_URL: url}
    assert local.choose(settings, environ=marked).embedded_home == tmp_path
    assert local.choose(settings, environ={}).embedded_home is None
    other = {local.ENV_EMBEDDED_URL: "postgresql+psycopg://postgres@/leaseflow?host=/else"}
    assert local.choose(settings, environ=other).embedded_home is None


def test_passwords_are_hidden_when_shown():
    assert local.shown("redis://:s3cret@host:6379/0") == "redis://:***@host:6379/0"
    assert local.shown("postgresql+psycopg://u:pw@h/db") == "postgresql+psycopg://u:***@h/db"


# -- resolving never touches the environment ----------------------------------------


def test_explicit_urls_are_returned_as_they_are(
    tmp_path: Path, fake_server: list[Path], fake_redis: list[Path]
):
    explicit = defaults(tmp_path).model_copy(
        update={"database_url": EXPLICIT_DB, "broker_url": EXPLICIT_BROKER}
    )
    environ = dict(os.environ)
    assert local.resolve(explicit) is explicit
    assert fake_server == fake_redis == [] and not tmp_path.joinpath("redis").exists()
    assert dict(os.environ) == environ


def test_resolving_the_defaults_fills_the_urls_and_leaves_os_environ_alone(
    tmp_path: Path,
    fake_server: list[Path],
    fake_redis: list[Path],
    capsys: pytest.CaptureFixture[str],
):
    # Given no URLs
    environ = dict(os.environ)
    # When the defaults are resolved (twice, as a client and a task of one process would)
    first = local.resolve(defaults(tmp_path / "h"))
    second = local.resolve(defaults(tmp_path / "h"))
    # Then the embedded servers of the home are used: PostgreSQL and Redis
    assert fake_server == fake_redis == [tmp_path / "h", tmp_path / "h"]
    assert first == second
    assert (
        first.database_url == f"postgresql+psycopg://postgres@/leaseflow?host={tmp_path}/h/pgdata"
    )
    assert first.broker_url == sock_url(tmp_path / "h")
    # And nothing was exported: the environment and get_settings() are as they were
    assert dict(os.environ) == environ
    assert (get_settings().database_url, get_settings().broker_url) == (None, None)
    # And one line said what is in use
    said = [line for line in capsys.readouterr().err.splitlines() if line.startswith("leaseflow:")]
    assert said == [
        f"leaseflow: database embedded PostgreSQL 18.1 at {tmp_path}/h/pgdata "
        f"(postgresql://postgres@/leaseflow?host={tmp_path}/h/pgdata); "
        f"broker embedded Redis 6.2.14 at {tmp_path}/h/redis ({sock_url(tmp_path / 'h')})"
    ]


def test_beat_resolves_only_the_broker(
    tmp_path: Path, fake_server: list[Path], fake_redis: list[Path]
):
    resolved = local.resolve(defaults(tmp_path), database=False)
    assert (fake_server, fake_redis) == ([], [tmp_path])
    assert (resolved.database_url, resolved.broker_url) == (None, sock_url(tmp_path))


def test_a_client_leaves_os_environ_alone(
    tmp_path: Path,
    fake_server: list[Path],
    fake_redis: list[Path],
    monkeypatch: pytest.MonkeyPatch,
):
    from leaseflow import client as client_mod
    from leaseflow.tasks import runtime

    made: list[Settings] = []
    monkeypatch.setattr(runtime, "make_store", lambda settings, **_: made.append(settings))
    environ = dict(os.environ)
    # When a client is made with no URLs
    client = client_mod.Client(settings=defaults(tmp_path))
    # Then it uses the embedded servers, and exported nothing
    assert fake_server == fake_redis == [tmp_path]
    assert client.settings.database_url == made[0].database_url is not None
    assert dict(os.environ) == environ


# -- what children are told --------------------------------------------------------------


def test_children_of_an_embedded_resolution_are_told_the_servers_and_the_markers(
    tmp_path: Path, fake_server: list[Path], fake_redis: list[Path]
):
    resolved = local.resolve(defaults(tmp_path / "h"))
    assert resolved.database_url is not None and resolved.broker_url is not None
    assert local.child_env(resolved) == {
        local.ENV_HOME: str(tmp_path / "h"),
        local.ENV_DATABASE_URL: resolved.database_url,
        local.ENV_BROKER_URL: resolved.broker_url,
        local.ENV_EMBEDDED_URL: resolved.database_url,
        local.ENV_EMBEDDED_BROKER_URL: resolved.broker_url,
    }


def test_children_of_explicit_urls_get_no_marker(tmp_path: Path):
    explicit = defaults(tmp_path).model_copy(
        update={"database_url": EXPLICIT_DB, "broker_url": EXPLICIT_BROKER}
    )
    assert local.child_env(explicit) == {
        local.ENV_HOME: str(tmp_path),
        local.ENV_DATABASE_URL: EXPLICIT_DB,
        local.ENV_BROKER_URL: EXPLICIT_BROKER,
    }


def test_exporting_puts_the_child_env_in_os_environ_and_get_settings_follows(
    tmp_path: Path,
    fake_server: list[Path],
    fake_redis: list[Path],
    monkeypatch: pytest.MonkeyPatch,
):
    resolved = local.resolve(defaults(tmp_path / "h"))
    for name in local.child_env(resolved):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    local.export_env(resolved)
    assert {k: os.environ[k] for k in local.child_env(resolved)} == local.child_env(resolved)
    assert get_settings().database_url == resolved.database_url
    assert get_settings().broker_url == resolved.broker_url
    # And a process of that environment takes the servers as the embedded ones, not foreign
    assert local.choose(get_settings()).embedded_home == tmp_path / "h"
    assert local.choose(get_settings()).broker_home == tmp_path / "h"


# -- where the files go -------------------------------------------------------------------


def test_the_socket_goes_in_the_data_directory_when_its_path_fits(tmp_path: Path):
    # Given a data directory short enough for a unix socket path
    pgdata = tmp_path / "pgdata"
    # Then the socket lives in it, wherever the runtime directory is
    assert pgctl.socket_dir(pgdata, "/run/user/1000") == pgdata
    assert pgctl.socket_dir(pgdata, None) == pgdata


def test_a_data_directory_too_deep_puts_the_socket_in_the_runtime_dir_else_nowhere():
    # Given a data directory too deep for a unix socket path
    pgdata = Path("/srv") / ("d" * 60) / ("e" * 40) / "pgdata"
    # Then the socket goes to a directory of its own in $XDG_RUNTIME_DIR
    found = pgctl.socket_dir(pgdata, "/run/user/1000")
    assert found is not None and found.parent == Path("/run/user/1000")
    assert found.name.startswith("leaseflow-pg-")
    assert pgctl.socket_dir(pgdata, "/run/user/1000") == found  # the same every time
    # And nowhere (never a shared temp dir) without one, or with a relative or deep one
    assert pgctl.socket_dir(pgdata, None) is None
    assert pgctl.socket_dir(pgdata, "run/user/1000") is None
    assert pgctl.socket_dir(pgdata, "/" + "r" * 100) is None


def test_a_users_cluster_lives_in_the_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(pgctl, "run_as", lambda: None)
    assert local.pgdata_dir(tmp_path / "h") == tmp_path / "h" / "pgdata"


def test_as_root_the_cluster_lives_in_a_directory_of_the_system_user(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Given root (PostgreSQL then runs as the system user, who cannot enter the home)
    monkeypatch.setattr(pgctl, "run_as", lambda: pgctl.SYSTEM_USER)
    (tmp_path / "h").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "h")
    # When the cluster of a home is placed
    pgdata = local.pgdata_dir(tmp_path / "h")
    # Then it is in a directory of its own under SYSTEM_DATA, one per home
    assert pgdata.parent.parent == system.SYSTEM_DATA and pgdata.name == "pgdata"
    assert local.pgdata_dir(tmp_path / "link") == pgdata  # the same home by another path
    assert local.pgdata_dir(tmp_path / "other") != pgdata
    # And its socket fits in it
    assert pgctl.socket_dir(pgdata, None) == pgdata


def test_beat_keeps_its_schedule_in_the_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    # Given a home that does not exist yet
    from leaseflow import cli

    monkeypatch.setenv("LEASEFLOW_HOME", str(tmp_path / "h"))
    reset_settings()
    # When beat's default schedule is asked for
    schedule = cli.default_schedule()
    # Then it is a file of the home, which is made private
    assert schedule == tmp_path / "h" / "celerybeat-schedule"
    assert os.stat(tmp_path / "h").st_mode & 0o777 == 0o700


# -- the embedded Redis's socket and configuration ----------------------------------------


def test_the_redis_socket_goes_in_the_homes_redis_directory_when_its_path_fits(tmp_path: Path):
    assert broker.socket_path(tmp_path, "/run/user/1000") == tmp_path / "redis" / "redis.sock"
    assert broker.socket_path(tmp_path, None) == tmp_path / "redis" / "redis.sock"


def test_a_home_too_deep_puts_the_redis_socket_in_the_runtime_dir_else_nowhere(
    monkeypatch: pytest.MonkeyPatch,
):
    # Given a home too deep for a unix socket path
    home = Path("/srv") / ("d" * 60) / ("e" * 40)
    # Then the socket goes to a directory of its own in the runtime directory, the same
    # every time, its path within the kernel's limit
    found = broker.socket_path(home, "/run/user/1000")
    assert found is not None and found.parent.parent == Path("/run/user/1000")
    assert found.parent.name.startswith("leaseflow-redis-") and found.name == "redis.sock"
    assert broker.socket_path(home, "/run/user/1000") == found
    assert len(str(found)) <= broker.MAX_SOCKET_PATH
    assert broker.socket_path(Path("/srv/other"), "/run/user/1000") != found
    # And nowhere without one, or with a relative or deep one
    assert broker.socket_path(home, None) is None
    assert broker.socket_path(home, "run/user/1000") is None
    assert broker.socket_path(home, "/" + "r" * 100) is None
    # And the runtime directory is XDG_RUNTIME_DIR, else only root's /run
    assert broker.runtime_dir({"XDG_RUNTIME_DIR": "/run/user/7"}) == "/run/user/7"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert broker.runtime_dir({}) == "/run"
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert broker.runtime_dir({}) is None
    # And with no place at all, the URL cannot be made: the error says what to do
    with pytest.raises(errors.ConfigurationError, match="XDG_RUNTIME_DIR"):
        local.broker_url(defaults(home))


def test_the_redis_configuration_opens_no_port_and_keeps_its_files_private(tmp_path: Path):
    # When the configuration of a home with a quote and a space in its path is written
    data = tmp_path / 'my "home"' / "redis"
    conf = redisctl.config(data, data / "redis.sock")
    lines = conf.splitlines()
    # Then it listens on the unix socket only, owner-only, and keeps an append-only file
    assert "port 0" in lines and "unixsocketperm 700" in lines
    assert "appendonly yes" in lines and "appendfsync everysec" in lines
    assert "daemonize yes" in lines and "loglevel warning" in lines
    quoted = str(data).replace('"', '\\"')
    assert f'unixsocket "{quoted}/redis.sock"' in lines
    assert f'dir "{quoted}"' in lines
    # And a path Redis could not read back is refused
    with pytest.raises(errors.ConfigurationError):
        redisctl.config(tmp_path / "a\nb", tmp_path / "s")
