"""Checkpoint codec: context JSON, zstd-compressed above a threshold, codec byte in front.

Layout: one codec byte, the payload, and a CRC-32 of both (4 bytes, big-endian). Codec
``2``: the payload is the JSON; ``3``: a zstd frame of it. The checksum makes any damage
of up to four adjacent bytes a refusal (``E-CHECKPOINT-CORRUPT``), never a different
value; it is checked before anything is decompressed. Checkpoints written before the
checksum (codec ``0`` raw, ``1`` zstd, no trailer) still decode. The size limit applies
to the JSON before compression, so a huge context is refused before anything is
compressed, written or sent.

The same framing (``pack``/``unpack``) stores artefacts' bytes.

Every value bound for the store (contexts, inputs, outputs, branch results, Map items)
first passes ``check``: what PostgreSQL would refuse at commit (a NUL byte, NaN) or
could not read back (nesting past ``MAX_DEPTH``), and what is not JSON at all, is
refused here, before the commit, naming the field (``output["text"]``) and why.
Error texts go to text columns through ``storable_text`` instead: escaped, never refused.
"""

from __future__ import annotations

import json
import math
import threading
import zlib
from typing import Any

import zstandard

from leaseflow import errors

LEGACY_RAW = 0  # read, no longer written: no checksum
LEGACY_ZSTD = 1
RAW = 2
ZSTD = 3
_CRC = 4  # bytes of the trailer
#: A zstd frame that declares more than this is damaged (or hostile): refused unread.
MAX_DECODED_BYTES = 64 * 1024 * 1024
#: How deep JSON arrays and objects may nest in a stored value (the outermost one is
#: level 1). Far below what PostgreSQL parses and what ``json`` reads back in a worker.
MAX_DEPTH = 100

_local = threading.local()


#: zstd's level (``LEASEFLOW_COMPRESS_LEVEL``): 5 keeps an agent context (prose, chat,
#: tool output) under 30% of its JSON (``python -m benchmarks codec``) at ~7 us per KB.
DEFAULT_LEVEL = 5


def _compressor(level: int = DEFAULT_LEVEL) -> zstandard.ZstdCompressor:
    cache: dict[int, zstandard.ZstdCompressor] | None = getattr(_local, "comp", None)
    if cache is None:
        cache = _local.comp = {}
    comp = cache.get(level)
    if comp is None:
        comp = cache[level] = zstandard.ZstdCompressor(level=level)
    return comp


def _decompressor() -> zstandard.ZstdDecompressor:
    dec = getattr(_local, "dec", None)
    if dec is None:
        dec = _local.dec = zstandard.ZstdDecompressor()
    return dec


# -- what the store can take ---------------------------------------------------------


class NotJSON(errors.UnstorableValue, TypeError):
    """A value of a type JSON has no form for (a ``TypeError``, as ``json.dumps`` raises)."""


class NotFinite(errors.UnstorableValue, ValueError):
    """NaN or an infinity (a ``ValueError``, as ``json.dumps(allow_nan=False)`` raises)."""


class _Refused(Exception):
    """Raised inside ``check``; collects the path to the bad field on its way out."""

    def __init__(self, error: type[errors.UnstorableValue], reason: str) -> None:
        super().__init__(reason)
        self.error = error
        self.reason = reason
        self.path: list[str] = []  # innermost first


def check(value: Any, *, what: str) -> None:
    """Refuse what the store cannot take: raises ``errors.UnstorableValue`` (``NotJSON``,
    ``NotFinite``) naming the first bad field from ``what`` (``output["a"][2]``) and why:
    a NUL byte or a lone surrogate in a string or key, NaN or an infinity, nesting past
    ``MAX_DEPTH``, a value that is not JSON. Never recurses deeper than ``MAX_DEPTH``."""
    try:
        _check_value(value, 1)
    except _Refused as refused:
        path = refused.path[::-1]
        if len(path) > 8:  # nested too deep: the outermost and innermost steps tell enough
            path = [*path[:4], f"...({len(path) - 6} more)...", *path[-2:]]
        raise refused.error(what + "".join(path), refused.reason) from None


#: Exact types that are JSON as they are: the loop below passes them at once.
_PLAIN = frozenset((int, bool, type(None)))


def _check_container(value: dict[Any, Any] | list[Any] | tuple[Any, ...], depth: int) -> None:
    """The items of an array or object; the common cases inline (this runs on every
    value of every checkpoint), anything unusual through ``_check_value``."""
    if depth > MAX_DEPTH:
        raise _Refused(errors.UnstorableValue, f"nests deeper than {MAX_DEPTH} levels")
    keyed = isinstance(value, dict)
    pairs = value.items() if isinstance(value, dict) else enumerate(value)
    for key, item in pairs:
        try:
            if keyed and (type(key) is not str or "\x00" in key or not key.isascii()):
                _check_key(key)
            kind = type(item)
            if kind is str:
                if "\x00" in item or not item.isascii():
                    _check_text(item)
            elif kind is dict or kind is list:
                _check_container(item, depth + 1)
            elif kind is float:
                if not math.isfinite(item):
                    _check_value(item, depth + 1)
            elif kind not in _PLAIN:
                _check_value(item, depth + 1)
        except _Refused as refused:
            refused.path.append(_key_step(key) if keyed else f"[{key}]")
            raise


def _check_value(value: Any, depth: int) -> None:
    """Any value, subclasses of the JSON types included; ``depth``: its nesting level."""
    if isinstance(value, str):
        _check_text(value)
    elif value is None or isinstance(value, int):  # bool is an int
        return
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise _Refused(NotFinite, f"{value!r} is not JSON-serialisable")
    elif isinstance(value, dict | list | tuple):
        _check_container(value, depth)
    else:
        raise _Refused(NotJSON, f"a value of type {type(value).__name__} is not JSON-serialisable")


def _check_text(text: str) -> None:
    if "\x00" in text:
        raise _Refused(errors.UnstorableValue, "contains a NUL byte (\\x00)")
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError as exc:
            char = f"\\u{ord(text[exc.start]):04x}"
            raise _Refused(errors.UnstorableValue, f"contains a lone surrogate ({char})") from None


def _check_key(key: Any) -> None:
    if isinstance(key, str):
        try:
            _check_text(key)
        except _Refused as refused:
            refused.reason = f"its key {refused.reason}"
            raise
    elif isinstance(key, float) and not math.isfinite(key):
        raise _Refused(NotFinite, f"its key {key!r} is not JSON-serialisable")
    elif not (key is None or isinstance(key, int | float)):
        raise _Refused(NotJSON, f"its key of type {type(key).__name__} is not JSON-serialisable")


def _key_step(key: Any) -> str:
    """The path step of ``key`` as JSON stores it (``1`` is ``["1"]``), ASCII only."""
    if isinstance(key, str):
        return f"[{json.dumps(key)}]"
    if key is None or isinstance(key, int | float):
        return f"[{json.dumps(json.dumps(key))}]"
    return f"[{storable_text(repr(key))}]"


def storable_text(text: str) -> str:
    """``text`` as a text column takes it: NUL as ``\\x00``, a lone surrogate as
    ``\\udxxx``. For error texts, which are escaped rather than refused."""
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode()
    return text


# -- the codec -----------------------------------------------------------------------


def dumps(value: Any, *, what: str, limit: int, setting: str | None = None) -> bytes:
    """Serialise ``value`` to compact JSON bytes, enforcing ``check`` and ``limit``.

    Raises ``UnstorableValue`` (naming the field, from ``what``) for what the store
    cannot take, and ``PayloadTooLarge`` above the limit.
    """
    check(value, what=what)
    raw = json.dumps(value, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()
    if len(raw) > limit:
        raise errors.PayloadTooLarge(what, len(raw), limit, setting)
    return raw


def encode(
    data: dict[str, Any],
    *,
    limit: int,
    compress_min: int = 256,
    level: int = DEFAULT_LEVEL,
    what: str = "checkpoint",
    setting: str | None = None,
) -> bytes:
    """The checkpoint of ``data`` (``dumps``, then ``pack``)."""
    raw = dumps(data, what=what, limit=limit, setting=setting)
    return pack(raw, compress_min=compress_min, level=level)


def pack(raw: bytes, *, compress_min: int = 256, level: int = DEFAULT_LEVEL) -> bytes:
    """``raw`` framed: codec byte, payload (zstd at ``level`` from ``compress_min``
    bytes), CRC-32."""
    if len(raw) >= compress_min:
        framed = bytes((ZSTD,)) + _compressor(level).compress(raw)
    else:
        framed = bytes((RAW,)) + raw
    return framed + zlib.crc32(framed).to_bytes(_CRC, "big")


def unpack(blob: bytes | memoryview | None, *, what: str = "checkpoint") -> bytes:
    """The bytes ``pack`` framed; any damage raises ``CheckpointError(E-CHECKPOINT-CORRUPT)``."""
    if blob is None or len(blob) == 0:
        raise errors.CheckpointError(errors.CHECKPOINT_CORRUPT, f"{what} is empty")
    blob = bytes(blob)
    codec = blob[0]
    if codec in (RAW, ZSTD):
        if len(blob) < 1 + _CRC:
            raise errors.CheckpointError(errors.CHECKPOINT_CORRUPT, f"{what} is truncated")
        framed, trailer = blob[:-_CRC], blob[-_CRC:]
        if zlib.crc32(framed).to_bytes(_CRC, "big") != trailer:
            raise errors.CheckpointError(
                errors.CHECKPOINT_CORRUPT,
                f"{what} fails its checksum ({len(blob)} bytes: damaged or truncated)",
            )
        payload, compressed = framed[1:], codec == ZSTD
    elif codec in (LEGACY_RAW, LEGACY_ZSTD):
        payload, compressed = blob[1:], codec == LEGACY_ZSTD
    else:
        raise errors.CheckpointError(errors.CHECKPOINT_CORRUPT, f"unknown codec byte {codec}")
    if not compressed:
        return payload
    try:
        size = zstandard.frame_content_size(payload)
        if size > MAX_DECODED_BYTES:
            raise errors.CheckpointError(
                errors.CHECKPOINT_CORRUPT, f"zstd frame declares {size} bytes"
            )
        return _decompressor().decompress(payload, max_output_size=MAX_DECODED_BYTES)
    except zstandard.ZstdError as exc:
        raise errors.CheckpointError(errors.CHECKPOINT_CORRUPT, f"{what}: {exc}") from exc


def decode(blob: bytes | memoryview | None) -> dict[str, Any]:
    """Decode a checkpoint; any damage raises ``CheckpointError(E-CHECKPOINT-CORRUPT)``."""
    payload = unpack(blob)
    try:
        value = json.loads(payload)
    except ValueError as exc:  # UnicodeDecodeError and JSONDecodeError included
        raise errors.CheckpointError(errors.CHECKPOINT_CORRUPT, f"checkpoint: {exc}") from exc
    if not isinstance(value, dict):
        raise errors.CheckpointError(errors.CHECKPOINT_CORRUPT, "checkpoint is not an object")
    return value
