"""Pure unit tests of the FSM core (leaseflow/fsm): no database, no broker.

Throwaway workflows are declared with ``register=False`` so they never reach the
process-wide registry.
"""

from __future__ import annotations

import json
import math
import pickle
import struct
import zlib
from datetime import UTC, datetime
from typing import Any

import pytest
import zstandard
from pydantic import BaseModel

from leaseflow import Complete, Retry, Workflow, errors
from leaseflow.fsm import checkpoint, graph, registry, validation
from leaseflow.fsm.definition import START
from leaseflow.fsm.retry import RetryDecision
from tests.helpers import ROOT


class Ctx(BaseModel):
    n: int = 0


def _noop(ctx: Any) -> Any:
    return Complete()


def declare(name: str, *states: tuple[str, dict[str, Any]]) -> Workflow:
    """A workflow out of ``(state, state_kwargs)`` pairs, kept out of the registry."""
    wf = Workflow(name, context=Ctx, register=False)
    for state, kwargs in states:
        wf.state(name=state, **kwargs)(_noop)
    return wf


def problems_of(wf: Workflow) -> dict[str, list[str]]:
    with pytest.raises(errors.InvalidDefinition) as caught:
        wf.validate()
    assert caught.value.workflow == wf.name
    return caught.value.problems


def mentions(problems: dict[str, list[str]], state: str, *words: str) -> bool:
    """Some problem of ``state`` mentions every one of ``words``."""
    return any(all(w in issue for w in words) for issue in problems.get(state, []))


# -- validation ---------------------------------------------------------------------


def test_a_sound_workflow_validates_and_lists_its_edges_entry_first():
    # Given a workflow with a branch, a loop with an exit, and an on_error state
    wf = declare(
        "sound",
        ("begin", {"initial": True, "to": ["work"]}),
        ("work", {"to": ["work", "done"], "on_error": "rescue"}),
        ("rescue", {}),
        ("done", {}),
    )
    # When it is validated
    validated = wf.validate()
    # Then it passes, and its edges start with the entry edge and include on_error
    assert validated is wf
    assert wf.initial.name == "begin"
    assert wf.edges() == [
        (START, "begin"),
        ("begin", "work"),
        ("work", "work"),
        ("work", "done"),
        ("work", "rescue"),
    ]
    assert START == ""


def test_on_error_already_in_to_is_one_edge_not_two():
    # Given a state whose on_error target is also a regular target
    wf = declare(
        "dup_edge",
        ("a", {"initial": True, "to": ["b"], "on_error": "b"}),
        ("b", {}),
    )
    # Then the edge appears once
    assert wf.edges() == [(START, "a"), ("a", "b")]
    assert wf.states["a"].targets == ("b",)


def test_unknown_to_target_is_named():
    # Given a state pointing at a state that does not exist
    wf = declare("bad_target", ("a", {"initial": True, "to": ["b", "ghost"]}), ("b", {}))
    # Then validation names the state and the unknown target
    problems = problems_of(wf)
    assert mentions(problems, "a", "unknown target", "'ghost'")
    assert set(problems) == {"a"}


def test_unknown_on_error_state_is_named():
    wf = declare(
        "bad_on_error", ("a", {"initial": True, "to": ["b"], "on_error": "nowhere"}), ("b", {})
    )
    problems = problems_of(wf)
    assert mentions(problems, "a", "on_error", "'nowhere'")


def test_an_unknown_target_suggests_the_closest_state():
    # Given a typo in to= and in on_error=
    wf = declare(
        "typo_target",
        ("received", {"initial": True, "to": ["chrage"], "on_error": "rescure"}),
        ("charge", {}),
        ("rescue", {}),
    )
    # Then each problem names the state the author probably meant
    problems = problems_of(wf)
    assert mentions(problems, "received", "unknown target 'chrage'", "did you mean 'charge'?")
    assert mentions(problems, "received", "on_error state 'rescure'", "did you mean 'rescue'?")


def test_an_unknown_target_with_no_close_state_gets_no_suggestion():
    wf = declare("far_target", ("a", {"initial": True, "to": ["zzz_unrelated"]}), ("done", {}))
    problems = problems_of(wf)
    assert mentions(problems, "a", "unknown target 'zzz_unrelated'")
    assert not mentions(problems, "a", "did you mean")


def test_a_suggestion_never_names_a_branch_state_as_a_target():
    # Given a typo closest to a branch state (never a legal target)
    wf = declare(
        "branch_typo",
        ("a", {"initial": True, "to": ["lookupp", "done"]}),
        ("lookup", {"branch": True}),
        ("done", {}),
    )
    # Then no branch is suggested
    assert not mentions(problems_of(wf), "a", "did you mean 'lookup'")


def test_branches_must_name_declared_branch_states():
    # Given a fork whose branches= has a typo and a plain state
    wf = declare(
        "bad_branches",
        ("gather", {"initial": True, "to": ["done"], "branches": ["fetch_dosc", "done"]}),
        ("fetch_docs", {"branch": True}),
        ("done", {}),
    )
    # Then both are named, the typo with a suggestion
    problems = problems_of(wf)
    assert mentions(problems, "gather", "unknown branch state 'fetch_dosc'", "'fetch_docs'?")
    assert mentions(problems, "gather", "'done' in branches=", "not a branch state")


def test_a_state_declaring_branches_needs_its_join_in_to():
    wf = declare(
        "fork_without_join",
        ("gather", {"initial": True, "branches": ["leaf"]}),
        ("leaf", {"branch": True}),
    )
    assert mentions(problems_of(wf), "gather", "branches=", "join must be in to=")


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        pytest.param({"end": "failure"}, ("end='failure'", "'completed', 'failed'"), id="value"),
        pytest.param({"end": "failed", "to": ["done"]}, ("end= and to=",), id="with-to"),
        pytest.param({"branch": True, "end": "completed"}, ("branch state", "end="), id="branch"),
        pytest.param({"branch": True, "branches": ["x"]}, ("branch state", "branches="), id="fork"),
    ],
)
def test_a_misplaced_end_or_branches_is_named(kwargs: dict[str, Any], words: tuple[str, ...]):
    wf = declare(
        "bad_end",
        ("a", {"initial": True, "to": ["done"]}),
        ("odd", kwargs),
        ("x", {"branch": True}),
        ("done", {}),
    )
    assert mentions(problems_of(wf), "odd", *words)


def test_declared_ends_and_branches_validate():
    wf = declare(
        "declared",
        ("gather", {"initial": True, "to": ["decide"], "branches": ["leaf"]}),
        ("leaf", {"branch": True}),
        ("decide", {"to": ["ok", "rejected"]}),
        ("ok", {"end": "completed"}),
        ("rejected", {"end": "failed"}),
    )
    assert wf.validate() is wf
    assert (wf.states["gather"].branches, wf.states["rejected"].end) == (("leaf",), "failed")


def test_no_initial_state_is_a_workflow_problem():
    wf = declare("no_initial", ("a", {"to": ["b"]}), ("b", {}))
    problems = problems_of(wf)
    assert mentions(problems, validation.WORKFLOW, "no initial state")


def test_two_initial_states_are_both_named():
    wf = declare(
        "two_initials",
        ("a", {"initial": True, "to": ["c"]}),
        ("b", {"initial": True, "to": ["c"]}),
        ("c", {}),
    )
    problems = problems_of(wf)
    assert mentions(problems, "a", "initial")
    assert mentions(problems, "b", "initial")
    assert "c" not in problems


def test_unreachable_state_is_named():
    wf = declare(
        "unreachable",
        ("a", {"initial": True, "to": ["b"]}),
        ("b", {}),
        ("island", {"to": ["b"]}),
    )
    problems = problems_of(wf)
    assert set(problems) == {"island"}
    assert mentions(problems, "island", "unreachable", "'a'")


def test_a_cycle_with_no_way_out_names_every_trapped_state():
    # Given a -> (b <-> c) with no exit, and a -> done
    wf = declare(
        "trap",
        ("a", {"initial": True, "to": ["b", "done"]}),
        ("b", {"to": ["c"]}),
        ("c", {"to": ["b"]}),
        ("done", {}),
    )
    # Then both states of the cycle are named, and only they
    problems = problems_of(wf)
    assert set(problems) == {"b", "c"}
    assert mentions(problems, "b", "no path to a final state")
    assert mentions(problems, "c", "no path to a final state")


def test_on_error_is_a_way_out_of_a_cycle():
    # Given a loop whose only exit is its on_error state
    wf = declare(
        "loop_exit",
        ("a", {"initial": True, "to": ["b"]}),
        ("b", {"to": ["a"], "on_error": "give_up"}),
        ("give_up", {}),
    )
    # Then it is sound
    assert wf.validate() is wf


def test_a_duplicate_state_name_is_named():
    wf = declare("dups", ("a", {"initial": True, "to": ["b"]}), ("b", {}), ("b", {}))
    problems = problems_of(wf)
    assert mentions(problems, "b", "more than once")


def test_an_empty_workflow_is_invalid():
    problems = problems_of(Workflow("empty", context=Ctx, register=False))
    assert mentions(problems, validation.WORKFLOW, "no state")


def test_a_non_positive_timeout_is_named():
    wf = declare("bad_timeout", ("a", {"initial": True, "timeout": 0}))
    assert mentions(problems_of(wf), "a", "timeout")


def test_one_error_names_every_offending_state():
    # Given a workflow with several faults in different states
    wf = declare(
        "many_faults",
        ("a", {"initial": True, "to": ["b", "ghost"], "on_error": "nowhere"}),
        ("b", {"to": ["c"]}),
        ("c", {"to": ["b"]}),
        ("island", {}),
        ("island", {}),
    )
    # When it is validated
    with pytest.raises(errors.InvalidDefinition) as caught:
        wf.validate()
    error = caught.value
    # Then one error carries every offending state, and its text names them all
    assert set(error.problems) == {"a", "b", "c", "island"}
    assert mentions(error.problems, "a", "'ghost'")
    assert mentions(error.problems, "a", "'nowhere'")
    assert mentions(error.problems, "island", "unreachable")
    assert mentions(error.problems, "island", "more than once")
    text = str(error)
    assert text.splitlines()[0] == "workflow 'many_faults' is invalid:"
    for state in ("a", "b", "c", "island"):
        assert f"  - {state}: " in text
    assert len(text.splitlines()) == 1 + sum(len(v) for v in error.problems.values())


def test_invalid_definition_survives_pickling():
    # Celery carries exceptions across processes
    wf = declare("pickled", ("a", {"to": ["ghost"]}))
    with pytest.raises(errors.InvalidDefinition) as caught:
        wf.validate()
    clone = pickle.loads(pickle.dumps(caught.value))
    assert clone.workflow == "pickled"
    assert clone.problems == caught.value.problems
    assert str(clone) == str(caught.value)


def test_an_invalid_workflow_has_no_initial_state_or_edges():
    wf = declare("no_edges", ("a", {"to": ["ghost"]}))
    with pytest.raises(errors.InvalidDefinition):
        _ = wf.initial
    with pytest.raises(errors.InvalidDefinition):
        wf.edges()


def test_declaring_a_state_after_validation_validates_again():
    # Given a valid workflow
    wf = declare("grows", ("a", {"initial": True}))
    wf.validate()
    # When a state pointing nowhere is added
    wf.state(name="b", to=["ghost"])(_noop)
    # Then the next validation sees it
    assert "b" in problems_of(wf)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"name": "bad name", "context": Ctx}, "name"),
        ({"name": "", "context": Ctx}, "name"),
        ({"name": "ok", "context": dict}, "pydantic"),
        ({"name": "ok", "context": Ctx, "version": 0}, "version"),
        ({"name": "ok", "context": Ctx, "context_version": 0}, "version"),
    ],
)
def test_a_malformed_workflow_header_is_refused(kwargs: dict[str, Any], fragment: str):
    with pytest.raises(errors.InvalidDefinition) as caught:
        Workflow(register=False, **kwargs)
    assert fragment in str(caught.value)


def test_task_name_and_state_spec_properties():
    wf = declare(
        "props",
        ("a", {"initial": True, "to": "b", "queue": "gpu", "timeout": 5.0}),
        ("b", {"on_error": "c"}),
        ("c", {}),
    )
    assert wf.task_name("a") == "leaseflow.props.a"
    a, b, c = wf.states["a"], wf.states["b"], wf.states["c"]
    assert a.to == ("b",)  # a bare string is one target, not characters
    assert (a.queue, a.timeout, a.final) == ("gpu", 5.0, False)
    assert (b.final, b.targets) == (False, ("c",))  # on_error alone is an exit
    assert c.final
    assert wf.spec("a") is a
    with pytest.raises(errors.UnknownState, match="no state 'ghost'"):
        wf.spec("ghost")


def test_register_false_keeps_a_workflow_out_of_the_registry():
    declare("never_registered", ("a", {"initial": True}))
    with pytest.raises(errors.UnknownWorkflow):
        registry.get("never_registered")


def test_registry_returns_the_newest_version_and_refuses_a_second_declaration():
    # Given two versions of one workflow in the registry
    v1 = Workflow("fsm_registry_probe", context=Ctx, version=1)
    v2 = Workflow("fsm_registry_probe", context=Ctx, version=2)
    try:
        # Then the newest is the default, and each version can be asked for
        assert registry.get("fsm_registry_probe") is v2
        assert registry.get("fsm_registry_probe", 1) is v1
        with pytest.raises(errors.UnknownWorkflow):
            registry.get("fsm_registry_probe", 3)
        # And a second definition of the same name and version is refused
        with pytest.raises(errors.ConfigurationError):
            Workflow("fsm_registry_probe", context=Ctx, version=2)
    finally:
        registry.unregister(v1)
        registry.unregister(v2)
    with pytest.raises(errors.UnknownWorkflow):
        registry.get("fsm_registry_probe")


def test_an_unknown_workflow_lists_the_known_ones_and_suggests_the_closest():
    # Given two registered workflows
    orders = Workflow("fsm_orders_probe", context=Ctx)
    other = Workflow("fsm_billing_probe", context=Ctx)
    try:
        # When a misspelt one is asked for
        with pytest.raises(errors.UnknownWorkflow) as caught:
            registry.get("fsm_ordres_probe")
    finally:
        registry.unregister(orders)
        registry.unregister(other)
    # Then the error names the closest and lists every known workflow
    message = str(caught.value)
    assert "did you mean 'fsm_orders_probe'?" in message
    assert "fsm_billing_probe" in message and "fsm_orders_probe" in message
    assert {"fsm_orders_probe", "fsm_billing_probe"} <= set(caught.value.known)


def test_an_unknown_version_lists_the_known_versions():
    v1 = Workflow("fsm_version_probe", context=Ctx, version=1)
    try:
        with pytest.raises(errors.UnknownWorkflow) as caught:
            registry.get("fsm_version_probe", 2)
    finally:
        registry.unregister(v1)
    assert "unknown workflow 'fsm_version_probe v2'" in str(caught.value)
    assert "did you mean 'fsm_version_probe v1'?" in str(caught.value)


def test_unknown_workflow_is_exported_and_survives_pickling():
    import leaseflow

    exc = errors.UnknownWorkflow("ordrs", None, ["orders", "billing"])
    again = pickle.loads(pickle.dumps(exc))
    assert leaseflow.UnknownWorkflow is errors.UnknownWorkflow
    assert "UnknownWorkflow" in leaseflow.__all__
    assert (again.name, again.version, again.known) == ("ordrs", None, ("orders", "billing"))
    assert str(again) == str(exc)
    assert "this process knows: none" in str(errors.UnknownWorkflow("x"))


# -- retry policy -----------------------------------------------------------------


def test_backoff_doubles_per_attempt():
    policy = Retry(max_attempts=10, backoff=1.5, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 4, 5)] == [1.5, 3.0, 6.0, 12.0, 24.0]


def test_backoff_is_capped_by_max_delay():
    policy = Retry(max_attempts=10, backoff=10, max_delay=25, jitter=0)
    assert [policy.delay(n) for n in (1, 2, 3, 8)] == [10, 20, 25, 25]


def test_zero_backoff_retries_at_once():
    assert Retry(backoff=0).delay(5, rand=0.99) == 0


@pytest.mark.parametrize("rand", [0.0, 0.1, 0.25, 0.5, 0.75, 0.999999])
def test_jitter_spreads_the_delay_within_bounds(rand: float):
    # Given a 4 s base delay and ±25 % jitter
    policy = Retry(backoff=4, jitter=0.25)
    # Then every draw lies in [3, 5]
    assert 3.0 <= policy.delay(1, rand) <= 5.0


def test_jitter_is_linear_in_the_callers_random_draw():
    policy = Retry(backoff=4, jitter=0.25)
    assert policy.delay(1, 0.0) == pytest.approx(3.0)
    assert policy.delay(1, 0.5) == pytest.approx(4.0)
    assert policy.delay(1, 1.0) == pytest.approx(5.0)
    # the cap applies before the jitter
    capped = Retry(backoff=100, max_delay=10, jitter=0.5)
    assert capped.delay(3, 1.0) == pytest.approx(15.0)


def test_decide_retries_until_max_attempts_counting_the_first():
    policy = Retry(max_attempts=3, backoff=1, jitter=0)
    exc = RuntimeError("boom")
    assert policy.decide(1, exc) == RetryDecision(retry=True, delay=1.0)
    assert policy.decide(2, exc) == RetryDecision(retry=True, delay=2.0)
    assert policy.decide(3, exc) == RetryDecision(retry=False)
    assert policy.decide(4, exc).retry is False


def test_a_single_attempt_policy_never_retries():
    assert Retry(max_attempts=1).decide(1, RuntimeError()).retry is False


def test_decide_passes_the_random_draw_to_the_delay():
    policy = Retry(max_attempts=5, backoff=2, jitter=0.5)
    assert policy.decide(2, ValueError(), rand=0.0).delay == pytest.approx(policy.delay(2, 0.0))
    assert policy.decide(2, ValueError(), rand=0.0).delay == pytest.approx(2.0)


def test_retry_on_filters_exception_types_subclasses_included():
    # Given a policy that retries connection errors only
    policy = Retry(max_attempts=3, retry_on=(ConnectionError,))
    # Then a connection error (or a subclass) is retried, anything else is not
    assert policy.decide(1, ConnectionError()).retry is True
    assert policy.decide(1, ConnectionRefusedError()).retry is True
    assert policy.decide(1, ValueError()).retry is False
    assert policy.decide(1, KeyboardInterrupt()).retry is False


def test_a_bare_exception_type_is_accepted_as_retry_on():
    policy = Retry(retry_on=TimeoutError)  # type: ignore[arg-type]
    assert policy.retry_on == (TimeoutError,)
    assert policy.decide(1, TimeoutError()).retry is True
    assert policy.decide(1, OSError()).retry is False


def test_by_default_every_exception_but_base_exceptions_is_retried():
    policy = Retry()
    assert policy.max_attempts == 3
    assert policy.decide(1, Exception()).retry is True
    assert policy.decide(1, SystemExit()).retry is False


def test_the_default_policy_is_the_one_the_readme_documents():
    policy = Retry()
    assert (policy.max_attempts, policy.backoff, policy.max_delay, policy.jitter) == (
        3,
        1.0,
        300.0,
        0.1,
    )
    readme = (ROOT / "README.md").read_text().split("## Writing a workflow", 1)[1]
    section = readme.split("\n## ", 1)[0]
    for words in ("3 attempts", "1 s", "300 s", "10%", "give_up_on"):
        assert words in section, words


def test_give_up_on_fails_at_once_even_for_a_retry_on_type():
    # Given a policy that retries every exception but gives up on ValueError
    policy = Retry(max_attempts=5, retry_on=(Exception,), give_up_on=(ValueError, KeyError))
    # Then a ValueError (or subclass) or KeyError is not retried, on any attempt
    assert policy.decide(1, ValueError("bad input")).retry is False
    assert policy.decide(1, UnicodeDecodeError("utf-8", b"", 0, 1, "x")).retry is False
    assert policy.decide(2, KeyError("k")).retry is False
    assert policy.gives_up_on(ValueError()) is True
    # And anything else still is
    assert policy.decide(1, ConnectionError()) == RetryDecision(retry=True, delay=policy.delay(1))
    assert policy.gives_up_on(ConnectionError()) is False
    # And by default nothing is given up on
    assert Retry().give_up_on == ()


def test_give_up_on_takes_a_bare_type_or_a_list_and_refuses_non_exceptions():
    assert Retry(give_up_on=ValueError).give_up_on == (ValueError,)  # type: ignore[arg-type]
    assert Retry(give_up_on=[TypeError]).give_up_on == (TypeError,)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="give_up_on takes exception types"):
        Retry(give_up_on=("ValueError",))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="retry_on takes exception types"):
        Retry(retry_on=(int,))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"max_attempts": 0},
        {"backoff": -1},
        {"max_delay": -1},
        {"jitter": -0.1},
        {"jitter": 1.5},
    ],
)
def test_a_nonsensical_policy_is_refused(kwargs: dict[str, Any]):
    with pytest.raises(ValueError):
        Retry(**kwargs)


# -- checkpoint codec --------------------------------------------------------------

LIMIT = 1024 * 1024


def _crc_ok(blob: bytes) -> bool:
    return zlib.crc32(blob[:-4]).to_bytes(4, "big") == blob[-4:]


def test_a_small_checkpoint_is_stored_raw_behind_codec_byte_2_with_a_crc():
    data = {"n": 1, "name": "zoë", "nested": {"xs": [1, 2.5, None, True]}}
    blob = checkpoint.encode(data, limit=LIMIT)
    assert blob[0] == checkpoint.RAW == 2
    assert json.loads(blob[1:-4]) == data
    assert _crc_ok(blob)
    assert "zoë".encode() in blob  # UTF-8, not \\u escapes
    assert checkpoint.decode(blob) == data


def test_a_large_checkpoint_is_zstd_behind_codec_byte_3_with_a_crc():
    data = {"trail": ["state"] * 500}
    blob = checkpoint.encode(data, limit=LIMIT, compress_min=256)
    assert blob[0] == checkpoint.ZSTD == 3
    assert (
        zstandard.ZstdDecompressor().decompress(blob[1:-4])
        == json.dumps(data, separators=(",", ":")).encode()
    )
    assert _crc_ok(blob)
    assert len(blob) < len(json.dumps(data))
    assert checkpoint.decode(blob) == data


def test_the_compression_threshold_is_inclusive():
    data = {"s": "x" * 20}
    size = len(checkpoint.dumps(data, what="t", limit=LIMIT))
    assert checkpoint.encode(data, limit=LIMIT, compress_min=size)[0] == checkpoint.ZSTD
    assert checkpoint.encode(data, limit=LIMIT, compress_min=size + 1)[0] == checkpoint.RAW
    assert checkpoint.encode({}, limit=LIMIT, compress_min=0)[0] == checkpoint.ZSTD


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(b'\x00{"a":[1,"z\xc3\xab"]}', id="raw"),
        pytest.param(
            b"\x01" + zstandard.ZstdCompressor().compress(b'{"a":[1,"z\xc3\xab"]}'), id="zstd"
        ),
    ],
)
def test_checkpoints_written_before_the_checksum_still_decode(blob: bytes):
    assert checkpoint.decode(blob) == {"a": [1, "zë"]}


def _framed(codec: int, payload: bytes) -> bytes:
    """A checkpoint with a valid checksum around ``payload``: damage the CRC cannot see."""
    framed = bytes((codec,)) + payload
    return framed + zlib.crc32(framed).to_bytes(4, "big")


def test_a_flipped_byte_fails_the_checksum_before_anything_is_decompressed():
    blob = bytearray(_ZSTD_BLOB)
    blob[len(blob) // 2] ^= 0x01
    with pytest.raises(errors.CheckpointError, match="fails its checksum"):
        checkpoint.decode(bytes(blob))


def test_decode_accepts_a_memoryview():
    blob = checkpoint.encode({"a": 1}, limit=LIMIT)
    assert checkpoint.decode(memoryview(blob)) == {"a": 1}


def test_the_size_limit_applies_to_the_json_before_compression(monkeypatch: pytest.MonkeyPatch):
    # Given a context that compresses to almost nothing but whose JSON is over the limit
    data = {"x": "a" * 5000}
    size = len(json.dumps(data, separators=(",", ":")))
    calls: list[int] = []
    monkeypatch.setattr(checkpoint, "_compressor", lambda level=0: calls.append(1))
    # When it is encoded with a limit below the JSON size
    with pytest.raises(errors.PayloadTooLarge) as caught:
        checkpoint.encode(data, limit=size - 1)
    # Then it is refused, measured uncompressed, and nothing was compressed
    assert (caught.value.what, caught.value.size, caught.value.limit) == (
        "checkpoint",
        size,
        size - 1,
    )
    assert caught.value.code == errors.PAYLOAD_TOO_LARGE
    assert calls == []


def test_a_checkpoint_exactly_at_the_limit_is_accepted():
    data = {"x": "a" * 100}
    size = len(checkpoint.dumps(data, what="t", limit=LIMIT))
    assert checkpoint.decode(checkpoint.encode(data, limit=size)) == data


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ({"x": math.nan}, ValueError),
        ({"x": math.inf}, ValueError),
        ({"when": datetime(2024, 1, 1, tzinfo=UTC)}, TypeError),
        ({"tags": {"a", "b"}}, TypeError),
        ({"blob": b"bytes"}, TypeError),
    ],
)
def test_values_that_are_not_json_are_refused(value: dict[str, Any], error: type[Exception]):
    with pytest.raises(error):
        checkpoint.encode(value, limit=LIMIT)


def _forged_zstd_header(content_size: int) -> bytes:
    """A zstd frame header that claims ``content_size`` bytes, followed by junk."""
    single_segment_8_byte_size = (3 << 6) | (1 << 5)
    magic = struct.pack("<I", 0xFD2FB528)
    return magic + bytes([single_segment_8_byte_size]) + struct.pack("<Q", content_size)


_ZSTD_BLOB = checkpoint.encode({"trail": ["state"] * 500}, limit=LIMIT)


@pytest.mark.parametrize(
    "blob",
    [
        pytest.param(None, id="none"),
        pytest.param(b"", id="empty"),
        pytest.param(b"\x07{}", id="unknown-codec"),
        pytest.param(b"\x02{}", id="too-short-for-its-crc"),
        pytest.param(_framed(2, b"{not json"), id="crc-raw-not-json"),
        pytest.param(_framed(2, b"\xff\xfe"), id="crc-raw-not-utf8"),
        pytest.param(_framed(3, b"not a zstd frame"), id="crc-zstd-garbage"),
        pytest.param(_framed(3, zstandard.ZstdCompressor().compress(b"[1]")), id="crc-zstd-array"),
        pytest.param(b"\x00{not json", id="raw-not-json"),
        pytest.param(b"\x00\xff\xfe\xfd", id="raw-not-utf8"),
        pytest.param(b"\x00", id="raw-no-payload"),
        pytest.param(b"\x01not a zstd frame", id="zstd-garbage"),
        pytest.param(_ZSTD_BLOB[: len(_ZSTD_BLOB) // 2], id="zstd-truncated"),
        pytest.param(b"\x01" + zstandard.ZstdCompressor().compress(b"{oops"), id="zstd-not-json"),
        pytest.param(b"\x00[1,2]", id="raw-array"),
        pytest.param(b'\x00"text"', id="raw-string"),
        pytest.param(b"\x01" + zstandard.ZstdCompressor().compress(b"null"), id="zstd-null"),
    ],
)
def test_a_damaged_checkpoint_fails_closed(blob: bytes | None):
    with pytest.raises(errors.CheckpointError) as caught:
        checkpoint.decode(blob)
    assert caught.value.code == errors.CHECKPOINT_CORRUPT
    assert str(caught.value).startswith("E-CHECKPOINT-CORRUPT: ")


def test_a_zstd_header_claiming_a_huge_size_fails_closed():
    # Given a corrupt checkpoint whose zstd header claims a terabyte
    blob = _framed(checkpoint.ZSTD, _forged_zstd_header(2**40) + b"\x01\x00\x00")
    # Then it is refused as corrupt, not by allocating a terabyte
    with pytest.raises(errors.CheckpointError) as caught:
        checkpoint.decode(blob)
    assert caught.value.code == errors.CHECKPOINT_CORRUPT


# -- graph rendering --------------------------------------------------------------


@pytest.fixture
def rescue_wf() -> Workflow:
    return declare(
        "rescue",
        ("begin", {"initial": True, "to": ["work"]}),
        ("work", {"to": ["done"], "on_error": "fallback"}),
        ("fallback", {}),
        ("done", {}),
    )


def test_mermaid_shows_entry_edges_on_error_and_exits(rescue_wf: Workflow):
    text = graph.render(rescue_wf, "mermaid")
    lines = text.splitlines()
    assert lines[0] == "stateDiagram-v2"
    assert "    [*] --> begin" in lines
    assert "    begin --> work" in lines
    assert "    work --> done" in lines
    assert "    work --> fallback: on_error" in lines
    assert "    done --> [*]" in lines
    assert "    fallback --> [*]" in lines
    assert "    work --> [*]" not in lines
    assert "classDef" not in text
    assert text.endswith("\n")


def test_mermaid_highlights_the_current_state(rescue_wf: Workflow):
    text = graph.render(rescue_wf, "mermaid", highlight="work")
    assert "    class work current" in text.splitlines()
    assert "classDef current" in text


def test_dot_shows_every_edge_and_marks_finals(rescue_wf: Workflow):
    text = graph.render(rescue_wf, "dot")
    lines = text.splitlines()
    assert lines[0] == 'digraph "rescue_v1" {'
    assert lines[-1] == "}"
    assert '    "__start__" -> "begin";' in lines
    assert '    "begin" -> "work";' in lines
    assert '    "work" -> "done";' in lines
    assert '    "work" -> "fallback" [style=dashed, label="on_error"];' in lines
    assert '    "done" [shape=doublecircle, style=rounded];' in lines
    assert '    "work" [shape=box, style=rounded];' in lines
    assert "fillcolor" not in text


def test_dot_highlights_the_current_state(rescue_wf: Workflow):
    text = graph.render(rescue_wf, "dot", highlight="done")
    assert '    "done" [shape=doublecircle, style="rounded,filled", fillcolor="#fde68a"];' in (
        text.splitlines()
    )


def test_graph_refuses_an_unknown_format_and_an_invalid_workflow(rescue_wf: Workflow):
    with pytest.raises(ValueError, match="mermaid, dot"):
        graph.render(rescue_wf, "svg")
    with pytest.raises(errors.InvalidDefinition):
        graph.render(declare("broken_graph", ("a", {"to": ["ghost"]})), "mermaid")


@pytest.fixture
def fork_wf() -> Workflow:
    return declare(
        "forky",
        ("gather", {"initial": True, "to": ["decide"], "branches": ["credit", "fraud"]}),
        ("credit", {"branch": True}),
        ("fraud", {"branch": True}),
        ("decide", {"to": ["ship", "rejected"]}),
        ("ship", {"end": "completed"}),
        ("rejected", {"end": "failed"}),
    )


def test_mermaid_draws_fork_branch_and_join_edges_of_declared_branches(fork_wf: Workflow):
    lines = graph.render(fork_wf, "mermaid").splitlines()
    for edge in (
        "    gather --> credit: fork",
        "    gather --> fraud: fork",
        "    credit --> decide: join",
        "    fraud --> decide: join",
    ):
        assert edge in lines, edge


def test_dot_draws_fork_branch_and_join_edges_of_declared_branches(fork_wf: Workflow):
    lines = graph.render(fork_wf, "dot").splitlines()
    assert '    "gather" -> "credit" [style=dashed, label="fork"];' in lines
    assert '    "fraud" -> "decide" [style=dashed, label="join"];' in lines


def test_without_declared_branches_no_fork_edge_is_guessed():
    wf = declare(
        "undeclared_fork",
        ("gather", {"initial": True, "to": ["decide"]}),
        ("credit", {"branch": True}),
        ("decide", {}),
    )
    text = graph.render(wf, "mermaid")
    assert ": fork" not in text and ": join" not in text
    assert "    credit: credit (branch)" in text.splitlines()


def test_the_join_is_drawn_only_when_the_forking_state_has_one_target():
    # Given a fork whose to= names two states (either may be the join)
    wf = declare(
        "two_joins",
        ("gather", {"initial": True, "to": ["left", "right"], "branches": ["leaf"]}),
        ("leaf", {"branch": True}),
        ("left", {}),
        ("right", {}),
    )
    lines = graph.render(wf, "mermaid").splitlines()
    # Then the fork edge is drawn, but no join edge is guessed
    assert "    gather --> leaf: fork" in lines
    assert not [line for line in lines if ": join" in line]


def test_mermaid_marks_failed_ends_apart_from_complete_and_undeclared_ends(fork_wf: Workflow):
    wf = declare("plain_end", ("a", {"initial": True, "to": ["b"]}), ("b", {}))
    lines = graph.render(fork_wf, "mermaid").splitlines()
    assert "    ship --> [*]: Complete" in lines
    assert "    rejected --> [*]: Failed" in lines
    assert "    class rejected failed_end" in lines
    assert "    b --> [*]" in graph.render(wf, "mermaid").splitlines()


def test_dot_draws_failed_ends_as_red_double_octagons(fork_wf: Workflow):
    lines = graph.render(fork_wf, "dot").splitlines()
    assert '    "rejected" [shape=doubleoctagon, color="#b91c1c", style=rounded];' in lines
    assert '    "ship" [shape=doublecircle, style=rounded];' in lines
