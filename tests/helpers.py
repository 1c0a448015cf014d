"""Test helpers: polling with deadlines, in-thread and subprocess workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from leaseflow.settings import Settings

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent


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


class WorkerProcess:
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
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        env = settings_env(settings)
        if faultpoints:
            env["LEASEFLOW_FAULTPOINTS"] = faultpoints
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
            f"{name}@%h",
            "-Q",
            settings.default_queue,
            "-l",
            "INFO",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            *extra_args,
        ]
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

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

    def signal_all(self, sig: int) -> None:
        """Send ``sig`` to the main process and its pool children."""
        for pid in [self.pid, *self.children()]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def kill(self) -> None:
        self.signal_all(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGCONT)
                os.killpg(self.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.pid, signal.SIGKILL)  # pool children left behind
        self._log.close()


class BeatProcess:
    """A real ``celery beat`` subprocess with its own schedule file."""

    def __init__(self, settings: Settings, log_dir: Path, *, name: str = "beat") -> None:
        self.log_path = log_dir / f"{name}.log"
        env = settings_env(settings)
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
        self._log = open(self.log_path, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            start_new_session=True,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()


@contextlib.contextmanager
def processes(*procs: WorkerProcess | BeatProcess) -> Iterator[None]:
    try:
        yield
    finally:
        for proc in procs:
            proc.stop()
