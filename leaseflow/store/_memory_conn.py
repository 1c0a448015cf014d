"""The connection ``ctx.in_commit`` callbacks get from the memory store."""

from __future__ import annotations

from typing import Any

from leaseflow.store._memory import InCommitWrite


class RecordingConnection:
    """The connection ``ctx.in_commit`` callbacks get from the memory store: each
    ``execute(sql, params)`` is recorded, and kept only if the commit lands."""

    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.writes: list[InCommitWrite] = []

    def execute(self, sql: str, params: Any = None) -> RecordingConnection:
        self.writes.append(InCommitWrite(self.run_id, sql, params))
        return self

    def fetchone(self) -> None:
        """Nothing is read back: the recorded writes have not run anywhere."""
        return None

    def fetchall(self) -> list[Any]:
        return []

    def cursor(self) -> RecordingConnection:
        """For callbacks written as ``with conn.cursor() as cur: cur.execute(...)``."""
        return self

    def __enter__(self) -> RecordingConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        return None
