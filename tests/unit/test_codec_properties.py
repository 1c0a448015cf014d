"""Properties of the checkpoint codec (issue 19, point 2), for any JSON context:

- it round-trips, stored raw (codec 2) or zstd-compressed (codec 3);
- any single changed byte of a checkpoint is refused (``E-CHECKPOINT-CORRUPT``) or
  decodes to the same value, and any strict prefix (a truncated stream) is refused;
- a checkpoint written before the checksum (codec 0: the JSON, 1: a zstd frame of it,
  no trailer) still decodes;
- a text with a NUL byte or a lone surrogate, in a value or a key, is refused before
  anything is encoded (``UnstorableValue``): the JSON strategy leaves such texts out.
"""

from __future__ import annotations

import json
import zlib
from typing import Any

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from leaseflow import errors
from leaseflow.fsm import checkpoint

LIMIT = 64 * 1024 * 1024  # the size limit is not under test here
HUGE = 1 << 62  # compress_min no JSON reaches: always stored raw
CODECS = {"raw": HUGE, "zstd": 0}  # compress_min per codec under test
#: Examples per property: enough to find a gap, few enough for a unit run of seconds.
EXAMPLES = settings(max_examples=300, deadline=None)

# -- JSON values ------------------------------------------------------------------------

#: Any character a checkpoint can hold: everything UTF-8 encodes (no surrogates) but NUL.
STORABLE_CHAR = st.characters(codec="utf-8", exclude_characters="\x00")
TEXT = st.text(STORABLE_CHAR, max_size=20)
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(2**200), max_value=2**200)  # past 64 bits
    | st.floats(allow_nan=False, allow_infinity=False)
    | TEXT
)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(TEXT, inner, max_size=5),
    max_leaves=12,
)
#: A context: a JSON object at the top.
CONTEXT = st.dictionaries(TEXT, JSON, max_size=4)


def _legacy(value: dict[str, Any], codec: int) -> bytes:
    """A checkpoint as written before the checksum: codec byte, payload, no trailer."""
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
    if codec == checkpoint.LEGACY_ZSTD:
        raw = zstandard.ZstdCompressor(level=3).compress(raw)
    return bytes((codec,)) + raw


# -- round trips ------------------------------------------------------------------------


@EXAMPLES
@given(value=CONTEXT)
def test_any_json_context_round_trips(value: dict[str, Any]) -> None:
    for codec, compress_min in CODECS.items():
        # Given any JSON object
        # When it is encoded with each codec, then decoded
        blob = checkpoint.encode(value, limit=LIMIT, compress_min=compress_min)

        # Then it comes back equal, stored under that codec behind a CRC-32 of the rest
        assert checkpoint.decode(blob) == value, codec
        assert blob[0] == (checkpoint.RAW if codec == "raw" else checkpoint.ZSTD)
        assert zlib.crc32(blob[:-4]).to_bytes(4, "big") == blob[-4:]


@EXAMPLES
@given(value=CONTEXT)
def test_a_checkpoint_from_before_the_checksum_still_decodes(value: dict[str, Any]) -> None:
    for codec in (checkpoint.LEGACY_RAW, checkpoint.LEGACY_ZSTD):
        # Given a checkpoint written before the checksum (codec 0 or 1, no trailer)
        blob = _legacy(value, codec)

        # When it is decoded, then its value comes back
        assert checkpoint.decode(blob) == value, codec


# -- damage -----------------------------------------------------------------------------


@EXAMPLES
@given(value=CONTEXT, data=st.data())
def test_one_changed_byte_is_refused_or_harmless(
    value: dict[str, Any], data: st.DataObject
) -> None:
    for codec, compress_min in CODECS.items():
        # Given a checkpoint with one of its bytes (codec byte, payload or trailer) changed
        blob = checkpoint.encode(value, limit=LIMIT, compress_min=compress_min)
        at = data.draw(st.integers(0, len(blob) - 1), label=f"{codec} position")
        new = blob[at] ^ data.draw(st.integers(1, 255), label="xor")  # any other value
        damaged = blob[:at] + bytes((new,)) + blob[at + 1 :]

        # When it is decoded
        try:
            decoded = checkpoint.decode(damaged)
        except errors.CheckpointError as exc:
            # Then it is refused as corrupt (past the codec byte: by the checksum,
            # before anything is decompressed)...
            assert exc.code == errors.CHECKPOINT_CORRUPT, exc
            assert at == 0 or "fails its checksum" in exc.detail, exc
            continue
        # ...or it decodes to the same value. Only a codec byte turned into a legacy
        # one (no checksum to check) can get here: the CRC-32 catches any other change.
        assert decoded == value, codec
        assert at == 0 and new in (checkpoint.LEGACY_RAW, checkpoint.LEGACY_ZSTD), (at, new)


@EXAMPLES
@given(value=CONTEXT, data=st.data())
def test_a_truncated_checkpoint_is_refused(value: dict[str, Any], data: st.DataObject) -> None:
    for codec, compress_min in CODECS.items():
        # Given a strict prefix of a checkpoint (the empty one included)
        blob = checkpoint.encode(value, limit=LIMIT, compress_min=compress_min)
        cut = data.draw(st.integers(0, len(blob) - 1), label=f"{codec} length kept")

        # When it is decoded, then it is refused as corrupt
        with pytest.raises(errors.CheckpointError) as caught:
            checkpoint.decode(blob[:cut])
        assert caught.value.code == errors.CHECKPOINT_CORRUPT, caught.value
        reasons = ("empty", "truncated", "fails its checksum")
        assert any(why in caught.value.detail for why in reasons), caught.value


# -- what a checkpoint cannot hold ------------------------------------------------------

#: A character no stored text may hold: NUL, or a lone surrogate.
UNSTORABLE_CHAR = st.just("\x00") | st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)


@st.composite
def unstorable_contexts(draw: st.DrawFn) -> dict[str, Any]:
    """A JSON object with one text somewhere (a value, a key, in a list, nested) holding
    an unstorable character."""
    bad = draw(TEXT) + draw(UNSTORABLE_CHAR) + draw(TEXT)
    where = draw(st.sampled_from(["value", "key", "list", "nested key"]))
    planted: dict[str, Any]
    if where == "value":
        planted = {"bad": bad}
    elif where == "key":
        planted = {bad: draw(JSON)}
    elif where == "list":
        planted = {"bad": [*draw(st.lists(JSON, max_size=3)), bad]}
    else:
        planted = {"bad": {"deeper": {bad: None}}}
    return {**draw(CONTEXT), **planted}


@EXAMPLES
@given(value=unstorable_contexts())
def test_a_nul_byte_or_lone_surrogate_is_refused(value: dict[str, Any]) -> None:
    # Given a context with a NUL byte or a lone surrogate in one of its texts
    # When it is encoded (either codec), then it is refused, naming the field and why
    for compress_min in CODECS.values():
        with pytest.raises(errors.UnstorableValue) as caught:
            checkpoint.encode(value, limit=LIMIT, compress_min=compress_min)
        assert caught.value.what.startswith("checkpoint["), caught.value
        assert "NUL byte" in caught.value.detail or "lone surrogate" in caught.value.detail
