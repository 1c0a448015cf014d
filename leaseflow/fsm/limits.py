"""The size limits of the values a run stores, and the codec's settings. Pure."""

from __future__ import annotations

from dataclasses import dataclass

from leaseflow.fsm import checkpoint

#: The settings that bound a value's JSON, named in ``PayloadTooLarge``.
PAYLOAD_SETTING = "LEASEFLOW_MAX_PAYLOAD_BYTES"
CHECKPOINT_SETTING = "LEASEFLOW_MAX_CHECKPOINT_BYTES"


@dataclass(frozen=True, slots=True)
class Limits:
    """Size limits of JSON values: ``max_payload_bytes`` for inputs, outputs, Map items,
    branch results and signal payloads, ``max_checkpoint_bytes`` for contexts (None: the
    payload limit) and one artefact; the size from which checkpoints and artefacts are
    compressed, and zstd's level."""

    max_payload_bytes: int
    compress_min_bytes: int = 256
    max_checkpoint_bytes: int | None = None
    max_artifact_bytes: int = 64 * 1024 * 1024
    compress_level: int = checkpoint.DEFAULT_LEVEL

    @property
    def checkpoint_limit(self) -> int:
        """The limit of a context's JSON."""
        if self.max_checkpoint_bytes is None:
            return self.max_payload_bytes
        return self.max_checkpoint_bytes
