"""Checkpoint codec: context JSON, zstd-compressed above a threshold, codec byte in front.

Layout: one codec byte (``0`` raw JSON, ``1`` zstd JSON) then the payload. The size
limit applies to the JSON before compression, so a huge context is refused before
anything is compressed, written or sent.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import zstandard

from leaseflow import errors

RAW = 0
ZSTD = 1
#: A zstd frame that declares more than this is damaged (or hostile): refused unread.
MAX_DECODED_BYTES = 64 * 1024 * 1024

_local = threading.local()


def _compressor() -> zstandard.ZstdCompressor:
    comp = getattr(_local, "comp", None)
    if comp is None:
        comp = _local.comp = zstandard.ZstdCompressor(level=3)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "dec", None)
    if dec is None:
        dec = _local.dec = zstandard.ZstdDecompressor()
    return dec


def dumps(value: Any, *, what: str, limit: int) -> bytes:
    """Serialise ``value`` to compact JSON bytes, enforcing ``limit``.

    Raises ``TypeError``/``ValueError`` for values that are not JSON (NaN included)
    and ``PayloadTooLarge`` above the limit.
    """
    raw = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    if len(raw) > limit:
        raise errors.PayloadTooLarge(what, len(raw), limit)
    return raw


def encode(data: dict[str, Any], *, limit: int, compress_min: int = 256) -> bytes:
    raw = dumps(data, what="checkpoint", limit=limit)
    if len(raw) >= compress_min:
        return bytes((ZSTD,)) + _compressor().compress(raw)
    return bytes((RAW,)) + raw


def decode(blob: bytes | memoryview | None) -> dict[str, Any]:
    """Decode a checkpoint; any damage raises ``CheckpointError(E-CHECKPOINT-CORRUPT)``."""
    if blob is None or len(blob) == 0:
        raise errors.CheckpointError(errors.CHECKPOINT_CORRUPT, "checkpoint is empty")
    blob = bytes(blob)
    codec, payload = blob[0], blob[1:]
    try:
        if codec == ZSTD:
            size = zstandard.frame_content_size(payload)
            if size > MAX_DECODED_BYTES:
                raise errors.CheckpointError(
                    errors.CHECKPOINT_CORRUPT, f"zstd frame declares {size} bytes"
                )
            payload = _decompressor().decompress(payload, max_output_size=MAX_DECODED_BYTES)
        elif codec != RAW:
            raise errors.CheckpointError(errors.CHECKPOINT_CORRUPT, f"unknown codec byte {codec}")
        value = json.loads(payload)
    except errors.CheckpointError:
        raise
    except (zstandard.ZstdError, ValueError) as exc:
        raise errors.CheckpointError(errors.CHECKPOINT_CORRUPT, str(exc)) from exc
    if not isinstance(value, dict):
        raise errors.CheckpointError(errors.CHECKPOINT_CORRUPT, "checkpoint is not an object")
    return value
