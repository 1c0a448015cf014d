"""``ctx.artifacts``: large values stored beside the run, not in its context.

A state puts bytes or text under a name and keeps the returned reference (a short
string) in its context; any later state of the run reads them back with ``get``.
Artefacts are zstd-compressed in ``lf_artifacts`` and written in the state's own fenced
commit: a state whose commit is refused (lease lost, raised, retried) leaves none
behind. One per run and name: a later state's ``put`` of the same name replaces it, and
a reference to the replaced one then fails (``ArtifactNotFound``) rather than read other
bytes. Purged with their run.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from leaseflow import errors
from leaseflow.fsm import checkpoint
from leaseflow.store import artifact_sql, base
from leaseflow.store.artifact_records import ArtifactRecord

__all__ = ["ArtifactRecord", "Artifacts", "parse_ref"]

#: A name: letters, digits and ``._-/``, starting with a letter or digit, 200 at most.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
PREFIX = "artifact:"
SETTING = "LEASEFLOW_MAX_ARTIFACT_BYTES"


def check_name(name: object) -> str:
    if not isinstance(name, str) or NAME.fullmatch(name) is None:
        raise errors.InvalidArtifact(
            f"artifact name {name!r} is invalid: 1 to 200 letters, digits or ._-/, "
            "starting with a letter or digit"
        )
    return name


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``(name, sha256 prefix or None)`` of a reference (``artifact:NAME@SHA``) or a name."""
    if not isinstance(ref, str):
        raise errors.InvalidArtifact(f"an artifact reference is a string, not {type(ref).__name__}")
    body = ref.removeprefix(PREFIX)
    name, _, digest = body.partition("@")
    return check_name(name), digest or None


@dataclass
class Artifacts:
    """``ctx.artifacts`` of one attempt of one state."""

    store: base.RunStore | None
    run_id: str
    state: str
    step_seq: int | None  # None in a branch
    #: Where this attempt's writes go: the state's in-commit writes (``ctx.in_commit``).
    sink: list[Callable[[Any], None]] = field(default_factory=list, repr=False)
    limit: int = 64 * 1024 * 1024
    compress_min: int = 256
    compress_level: int = checkpoint.DEFAULT_LEVEL
    #: This attempt's puts, by name, readable before its commit.
    _pending: dict[str, tuple[bytes, str]] = field(default_factory=dict, repr=False)

    def put(self, name: str, data: bytes | str, content_type: str | None = None) -> str:
        """Store ``data`` as ``name`` with this state's commit; returns its reference
        (``artifact:NAME@SHA``) to keep in the context. Text is stored as UTF-8
        (``content_type`` ``text/plain; charset=utf-8`` unless given). Raises
        ``InvalidArtifact`` and ``PayloadTooLarge`` (``LEASEFLOW_MAX_ARTIFACT_BYTES``)."""
        check_name(name)
        if isinstance(data, str):
            raw = data.encode("utf-8", "surrogatepass")
            content_type = content_type or "text/plain; charset=utf-8"
        elif isinstance(data, bytes | bytearray | memoryview):
            raw = bytes(data)
            content_type = content_type or "application/octet-stream"
        else:
            raise errors.InvalidArtifact(
                f"artifact {name!r}: data must be bytes or str, not {type(data).__name__}"
            )
        if len(raw) > self.limit:
            raise errors.PayloadTooLarge(f"artifact {name!r}", len(raw), self.limit, SETTING)
        blob = checkpoint.pack(raw, compress_min=self.compress_min, level=self.compress_level)
        digest = hashlib.sha256(raw).hexdigest()
        params = {
            "run_id": self.run_id,
            "name": name,
            "content_type": content_type,
            "codec": blob[0],
            "data": blob,
            "size_bytes": len(raw),
            "stored_bytes": len(blob),
            "sha256": digest,
            "state": self.state,
            "step_seq": self.step_seq,
        }
        self._pending[name] = (raw, digest)
        self.sink.append(ArtifactWrite(params))
        return f"{PREFIX}{name}@{digest[:16]}"

    def get(self, ref: str) -> bytes:
        """The bytes of an artefact of this run, by reference or by name (this
        attempt's own puts included). Raises ``ArtifactNotFound``."""
        name, digest = parse_ref(ref)
        if name in self._pending:
            raw, have = self._pending[name]
        else:
            if self.store is None:
                raise errors.ArtifactNotFound(self.run_id, name)
            record = self.store.get_artifact(self.run_id, name)
            assert record.data is not None
            raw, have = record.data, record.sha256
        if digest is not None and not have.startswith(digest):
            raise errors.ArtifactNotFound(
                self.run_id, name, f"replaced since reference {ref!r} was taken"
            )
        return raw

    def get_text(self, ref: str) -> str:
        """``get`` decoded as UTF-8."""
        return self.get(ref).decode("utf-8", "surrogatepass")


@dataclass(frozen=True)
class ArtifactWrite:
    """An in-commit write (``ctx.in_commit``) of one artefact: runs in the commit's
    transaction on PostgreSQL; the memory store keeps it when its commit lands."""

    params: dict[str, Any]

    def __call__(self, conn: Any) -> None:
        conn.execute(artifact_sql.PUT, self.params)
