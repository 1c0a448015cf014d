"""What the store can take (leaseflow/fsm/checkpoint.py: ``check``, ``storable_text``)
and the refusal of new runs' inputs that it cannot take (``rules.first_checkpoint``)."""

from __future__ import annotations

import math
import pickle
from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import BaseModel

from leaseflow import Complete, Workflow, errors
from leaseflow.fsm import checkpoint, rules
from leaseflow.testing import engine

LIMITS = rules.Limits(max_payload_bytes=1 << 20)
DEPTH = checkpoint.MAX_DEPTH


def nested(depth: int, leaf: Any = 0) -> Any:
    """``leaf`` inside ``depth`` lists."""
    value = leaf
    for _ in range(depth):
        value = [value]
    return value


def refusal(value: Any, what: str = "output") -> errors.UnstorableValue:
    with pytest.raises(errors.UnstorableValue) as refused:
        checkpoint.check(value, what=what)
    return refused.value


# -- the validator -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "path", "reason"),
    [
        ({"text": "a\x00b"}, 'output["text"]', "contains a NUL byte (\\x00)"),
        ({"a": [1, {"b\x00": 2}]}, 'output["a"][1]["b\\u0000"]', "its key contains a NUL"),
        ({"s": "a\ud800"}, 'output["s"]', "contains a lone surrogate (\\ud800)"),
        ([0, [1, math.nan]], "output[1][1]", "nan is not JSON-serialisable"),
        ({"x": -math.inf}, 'output["x"]', "-inf is not JSON-serialisable"),
        ({"tags": {"a"}}, 'output["tags"]', "a value of type set is not JSON-serialisable"),
        ({"at": datetime(2030, 1, 1, tzinfo=UTC)}, 'output["at"]', "type datetime is not"),
        ({"blob": b"\x00"}, 'output["blob"]', "type bytes is not JSON-serialisable"),
        ({(1, 2): 1}, "output[(1, 2)]", "its key of type tuple is not JSON-serialisable"),
        ({7: {None: "\x00"}}, 'output["7"]["null"]', "NUL"),
    ],
)
def test_a_value_the_store_cannot_take_is_refused_naming_its_field_and_why(
    value: Any, path: str, reason: str
):
    # When
    refused = refusal(value)
    # Then
    assert refused.what == path
    assert reason in refused.detail
    assert str(refused) == f"{path} cannot be stored: {refused.detail}"
    assert refused.code == errors.STATE_ERROR


def test_json_values_of_every_kind_pass():
    value = {"s": "zoë ✓", "n": 1, "f": 2.5, "b": True, "none": None, "l": [1, (2, 3)], 4: "k"}
    checkpoint.check(value, what="output")
    checkpoint.check(nested(DEPTH - 1, {"leaf": 1}), what="output")  # DEPTH levels in all


def test_nesting_is_refused_past_max_depth_without_recursing_further():
    # Given values nested one level past the limit, and far past Python's recursion limit
    just_past = nested(DEPTH + 1)
    far_past = {"tree": nested(100_000)}

    # When / Then: both are refused, naming the depth (the path is shortened)
    assert "nests deeper than 100 levels" in refusal(just_past).detail
    refused = refusal(far_past)
    assert refused.what == 'output["tree"][0][0][0]...(94 more)...[0][0]'
    checkpoint.check(nested(DEPTH), what="output")


def test_a_value_that_contains_itself_is_refused_as_too_deep():
    loop: list[Any] = []
    loop.append(loop)
    assert "nests deeper" in refusal({"loop": loop}).detail


def test_refusals_are_type_and_value_errors_as_json_dumps_raises_and_survive_pickling():
    not_json = refusal({"x": {1}})
    not_finite = refusal({"x": math.nan})
    assert isinstance(not_json, TypeError) and isinstance(not_finite, ValueError)
    again = pickle.loads(pickle.dumps(not_json))
    assert (type(again), again.what, again.detail) == (
        checkpoint.NotJSON,
        not_json.what,
        not_json.detail,
    )


def test_dumps_and_encode_refuse_through_the_validator_naming_what():
    with pytest.raises(errors.UnstorableValue, match=r'^branch result\["t"\] cannot be'):
        checkpoint.dumps({"t": "\x00"}, what="branch result", limit=1000)
    with pytest.raises(errors.UnstorableValue, match=r'^context\["t"\] cannot be'):
        checkpoint.encode({"t": "\x00"}, limit=1000, what="context")
    with pytest.raises(errors.UnstorableValue, match=r'^checkpoint\["t"\]'):
        checkpoint.encode({"t": "\x00"}, limit=1000)


@pytest.mark.parametrize(
    ("text", "stored"),
    [
        ("plain", "plain"),
        ("a\x00b", "a\\x00b"),
        ("zoë\ud800!", "zoë\\ud800!"),
    ],
)
def test_error_texts_are_escaped_for_text_columns_never_refused(text: str, stored: str):
    assert checkpoint.storable_text(text) == stored
    stored.encode()  # UTF-8 throughout


# -- new runs --------------------------------------------------------------------------


class Note(BaseModel):
    note: str = ""
    extra: Any = None


def notes() -> Workflow:
    wf = Workflow("payload_notes", context=Note, register=False)
    wf.state(initial=True, name="only")(lambda ctx: Complete())
    return wf


@pytest.mark.parametrize(
    ("payload", "words"),
    [
        ({"note": "a\x00b"}, 'input["note"] cannot be stored: contains a NUL byte'),
        ({"extra": {"k\x00": 1}}, 'input["extra"]["k\\u0000"] cannot be stored'),
        ({"extra": nested(100_000)}, "nests deeper than 100 levels"),
        ({"extra": [math.inf]}, 'input["extra"][0] cannot be stored: inf is not JSON'),
    ],
)
def test_an_input_the_store_cannot_take_is_refused_at_submit_naming_the_field(
    payload: dict[str, Any], words: str
):
    # When
    with pytest.raises(errors.InvalidInput) as refused:
        rules.first_checkpoint(notes(), payload, LIMITS)
    # Then
    assert refused.value.code == errors.CONTEXT_INVALID
    assert words in str(refused.value)


def test_the_testing_engine_refuses_such_an_input_and_creates_nothing():
    with engine() as eng:
        # When
        with pytest.raises(errors.InvalidInput, match=r'input\["note"\]'):
            eng.start(notes(), {"note": "\x00"})
        # Then
        assert eng.store.list_runs() == [] and eng.pending() == []
