"""Test helpers: polling with deadlines, in-thread and subprocess workers."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from leaseflow.settings import Settings

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent

#: Every subprocess started by these helpers (each leads its own process group),
#: so a test can check that none outlived it: see :func:`leaked_processes`.
_started: list[WorkerProcess | BeatProcess] = []
#: The environment variable that marks a helper-started process and its descendants.
MARKER = "LF_TEST_MARKER"


def eventually(
    check: Callable[[], T],
    *,
    timeout: float = 30.0,
    interval: float = 0.05,
    message: str = "condition",
) -> T:
    """Poll ``check`` until it returns a truthy value; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{message} not reached within {timeout}s (last: {value!r})")
        time.sleep(interval)


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a subprocess needs to see ``settings``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEASEFLOW_")}
    values = settings.model_dump()
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, list):
            value = ",".join(value)
        env[f"LEASEFLOW_{key.upper()}"] = str(value)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


class _Subprocess:
    """A ``celery`` subprocess leading its own process group, its output in a log file.

    Its environment carries a marker of its own (``LF_TEST_MARKER``), inherited by
    every descendant: :meth:`members` finds the family by it, immune to PID reuse
    and to a child leaving the process group.
    """

    name: str
    log_path: Path
    proc: subprocess.Popen[bytes]
    _terminated = False  # SIGTERM sent (by :meth:`terminate`)

    def _spawn(self, cmd: list[str], env: dict[str, str]) -> None:
        self.marker = f"{MARKER}={uuid.uuid4().hex}"
        name, _, value = self.marker.partition("=")
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            env={**env, name: value},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,  # pgid == pid: the whole family is one signal away
        )
        _started.append(self)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, text: str, *, timeout: float = 30.0) -> str:
        """Wait until ``text`` appears in the log; returns the log."""
        return eventually(
            lambda: text in (log := self.log()) and log,
            timeout=timeout,
            message=f"{text!r} in the log of {self.name}",
        )

    def members(self) -> list[tuple[int, str]]:
        """This process and its descendants still alive (not zombies): ``(pid, cmdline)``."""
        return _processes_with(self.marker)

    def _signal_group(self, sig: int) -> None:
        # Only while the leader is not reaped: until then its pid (our pgid) cannot
        # be reused by an unrelated process group.
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, sig)

    def _kill_members(self) -> None:
        for pid, _ in self.members():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)

    def terminate(self) -> None:
        """Ask for a warm shutdown (SIGCONT + SIGTERM to the group) without waiting; once.

        :func:`stop_together` asks every process first, then waits for each: stopping
        several takes as long as the slowest one, not as long as all of them.
        """
        if self.proc.returncode is None and not self._terminated:
            self._terminated = True
            self._signal_group(signal.SIGCONT)
            self._signal_group(signal.SIGTERM)

    def stop(self, timeout: float = 15.0) -> None:
        """Warm shutdown (SIGCONT + SIGTERM), SIGKILL after ``timeout``; idempotent.

        Whatever of the family outlives its main process is SIGKILLed too.
        """
        if self.proc.returncode is None:
            self.terminate()  # unless already asked: a second SIGTERM is not sent
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._kill_members()  # pool children left behind
        if not self._log.closed:
            self._log.close()


class WorkerProcess(_Subprocess):
    """A real ``celery worker`` subprocess (prefork), its log in a file."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        *,
        name: str = "w1",
        concurrency: int = 1,
        pool: str = "prefork",
        faultpoints: str = "",
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        full_env = settings_env(settings, **(env or {}))
        if faultpoints:
            full_env["LEASEFLOW_FAULTPOINTS"] = faultpoints
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "leaseflow.tasks",
            "worker",
            "-P",
            pool,
            "-c",
            str(concurrency),
            "-n",
            # A node name of its own: suites running at once on one broker (the chaos
            # profile beside the main suite in CI) must not share a pidbox queue.
            f"{name}-{uuid.uuid4().hex[:6]}@%h",
            "-Q",
            settings.default_queue,
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *extra_args,
        ]
        self._spawn(cmd, full_env)

    def wait_ready(self, timeout: float = 30.0) -> WorkerProcess:
        eventually(
            lambda: "ready." in self.log() or self.proc.poll() is not None,
            timeout=timeout,
            message=f"worker {self.name} ready",
        )
        if self.proc.poll() is not None:
            raise AssertionError(f"worker {self.name} exited:\n{self.log()[-4000:]}")
        return self

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.pid)], capture_output=True, text=True)
        return [int(p) for p in out.stdout.split()]

    def worker_ids(self) -> list[str]:
        """The leaseflow worker ids of the pool children now alive (``host:pid``)."""
        host = socket.gethostname()
        return [f"{host}:{pid}" for pid in self.children()]

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to the main process and its pool children."""
        for pid in [self.pid, *self.children()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        """SIGKILL the main process and its pool children (``kill -9 $MAIN $(pgrep -P)``)."""
        self.signal_all(signal.SIGKILL)
        self._signal_group(signal.SIGKILL)  # a child forked meanwhile
        self.proc.wait(timeout=10)
        eventually(
            lambda: not self.members(),
            timeout=10,
            message=f"every process of worker {self.name} gone",
        )


class BeatProcess(_Subprocess):
    """A real ``celery beat`` subprocess with its own schedule file."""

    def __init__(
        self,
        settings: Settings,
        log_dir: Path,
        *,
        name: str = "beat",
        env: dict[str, str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        cmd = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "leaseflow.tasks",
            "beat",
            "-l",
            "INFO",
            "-s",
            str(log_dir / f"{name}-schedule"),
            "--pidfile",
            "",
        ]
        self._spawn(cmd, settings_env(settings, **(env or {})))

    def stop(self, timeout: float = 10.0) -> None:
        super().stop(timeout)


def stop_together(procs: Iterable[_Subprocess]) -> None:
    """Warm-stop ``procs`` at once: every one is asked (SIGCONT + SIGTERM) before any is
    waited for, then each gets its :meth:`~_Subprocess.stop` (SIGKILL after its timeout).
    Every process is stopped even when one stop fails; the first error is raised."""
    chosen = list(procs)
    for proc in chosen:
        proc.terminate()
    errors: list[BaseException] = []
    for proc in chosen:
        try:
            proc.stop()
        except Exception as exc:  # stop the others first, then report
            errors.append(exc)
    if errors:
        raise errors[0]


@contextlib.contextmanager
def processes(*procs: WorkerProcess | BeatProcess) -> Iterator[None]:
    """Stop every process on the way out (all at once), even when the body or one stop
    fails."""
    try:
        yield
    finally:
        stop_together(procs)


def _processes_with(marker: str) -> list[tuple[int, str]]:
    """Live (non-zombie) processes whose environment holds ``marker``: ``(pid, cmdline)``."""
    needle = marker.encode() + b"\0"
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle not in (entry / "environ").read_bytes() + b"\0":
                continue
            stat = (entry / "stat").read_text()
            if stat[stat.rindex(")") + 2] in "ZX":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):
            continue  # exited while we looked, or not ours to read
        found.append((int(entry.name), cmdline.strip()))
    return found


def leaked_processes(
    procs: Iterable[WorkerProcess | BeatProcess] | None = None,
) -> list[tuple[int, str]]:
    """Processes still alive from ``procs`` (default: every one these helpers started)."""
    return [member for proc in (_started if procs is None else procs) for member in proc.members()]


def kill_leaked(
    procs: Iterable[WorkerProcess | BeatProcess] | None = None,
) -> list[tuple[int, str]]:
    """Stop ``procs`` (default: all started), SIGKILL what is left; returns what was left.

    A test calls it last and fails when the answer is not empty.
    """
    chosen = list(_started if procs is None else procs)
    leaked = leaked_processes(chosen)
    for proc in chosen:
        proc.stop(timeout=5)
        with contextlib.suppress(ValueError):
            _started.remove(proc)
    return leaked


# -- the Redis broker, seen from outside -------------------------------------------------


def broker_messages(redis_url: str, queue: str) -> list[dict[str, Any]]:
    """The task messages of ``queue`` waiting in Redis or delivered but not yet acked.

    Each item: ``{"task", "args", "id", "where"}`` with ``where`` ``queued`` or ``unacked``.
    """
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        raw: list[tuple[str, bytes]] = []
        for key in client.scan_iter(match=f"{queue}*"):
            name = key.decode()
            if name == queue or name.startswith(f"{queue}\x06\x16"):
                raw += [("queued", body) for body in client.lrange(key, 0, -1)]
        for value in client.hvals("unacked"):
            payload, _exchange, routing_key = json.loads(value)
            if routing_key == queue:
                raw.append(("unacked", json.dumps(payload).encode()))
    finally:
        client.close()
    out = []
    for where, body in raw:
        message = json.loads(body)
        headers = message.get("headers", {})
        args = headers.get("argsrepr")
        out.append(
            {"task": headers.get("task"), "args": args, "id": headers.get("id"), "where": where}
        )
    return out


def forget_unacked(redis_url: str, queue: str) -> int:
    """Drop the unacked entries a SIGKILLed worker left for ``queue``.

    Kombu would restore them into the (deleted) test queue after its visibility
    timeout, long after the test; returns how many were dropped.
    """
    import redis

    client = redis.Redis.from_url(redis_url)
    dropped = 0
    try:
        for tag, value in client.hgetall("unacked").items():
            _payload, _exchange, routing_key = json.loads(value)
            if routing_key == queue:
                client.zrem("unacked_index", tag)
                dropped += client.hdel("unacked", tag)
    finally:
        client.close()
    return dropped
