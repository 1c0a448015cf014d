"""What the store returns about artefacts."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any


@dataclass(frozen=True, slots=True)
class ArtifactRecord:
    """An artefact a state put (``ctx.artifacts.put``): ``data`` is its bytes as put
    (None in listings), ``size_bytes`` their length, ``stored_bytes`` compressed."""

    run_id: str
    name: str
    content_type: str | None
    size_bytes: int
    stored_bytes: int
    sha256: str
    state: str | None
    step_seq: int | None
    created_at: datetime
    data: bytes | None = None

    @property
    def text(self) -> str:
        """The bytes as UTF-8 text."""
        if self.data is None:
            raise ValueError(f"artifact {self.name!r} was listed without its data")
        return self.data.decode()

    def to_dict(self) -> dict[str, Any]:
        """The metadata (never the data) as JSON-ready values."""
        return {
            "name": self.name,
            "content_type": self.content_type,
            "size_bytes": self.size_bytes,
            "stored_bytes": self.stored_bytes,
            "sha256": self.sha256,
            "state": self.state,
            "step_seq": self.step_seq,
            "created_at": self.created_at.isoformat(),
        }
