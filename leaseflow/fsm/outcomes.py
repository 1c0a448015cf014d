"""What a state function may return."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Next:
    """Move to ``state`` (a plain state name returned by a state means the same)."""

    state: str


@dataclass(frozen=True, slots=True)
class Complete:
    """Finish the run successfully; ``output`` must be JSON-serialisable."""

    output: Any = None


@dataclass(frozen=True, slots=True)
class Failed:
    """Finish the run as failed, with a reason and an optional application error code."""

    reason: str
    code: str | None = None


Outcome = Next | Complete | Failed | str
