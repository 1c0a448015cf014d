"""Artefacts (``ctx.artifacts``): written in the state's fenced commit, read back by
name or reference, replaced by name, never left behind by a commit that did not land."""

from __future__ import annotations

import pytest

from leaseflow import errors
from leaseflow.artifacts import Artifacts
from tests.contract.test_branches import claim_branch, forked
from tests.contract.workflows import done, linear, move


def artifacts(env, claim, sink: list) -> Artifacts:
    """``ctx.artifacts`` as the runner builds it for ``claim``."""
    seq = getattr(claim, "step_seq", None)
    return Artifacts(env.store, claim.run_id, claim.state, seq, sink=sink)


def test_an_artifact_lands_with_its_commit_and_reads_back_by_reference(env):
    # Given a state that puts a text and some bytes
    run_id = env.start(linear)
    claim = env.claim(run_id)
    writes: list = []
    arts = artifacts(env, claim, writes)
    text = "a long report. " * 2000
    ref = arts.put("reports/summary.md", text, content_type="text/markdown")
    raw_ref = arts.put("blob.bin", bytes(range(256)))
    assert arts.get_text(ref) == text  # readable before its commit

    # When the state commits
    assert env.store.commit(claim, move("second"), worker="w1", callbacks=writes) is not None

    # Then both read back, compressed at rest, described in the run
    got = env.store.get_artifact(run_id, "reports/summary.md")
    assert (got.text, got.content_type, got.size_bytes) == (text, "text/markdown", len(text))
    assert got.stored_bytes < got.size_bytes / 20
    assert (got.state, got.step_seq) == ("first", 1)
    later = artifacts(env, env.claim(run_id, 2), [])
    assert later.get(raw_ref) == bytes(range(256))
    assert later.get("blob.bin") == bytes(range(256))
    listed = env.store.get_run(run_id).artifacts
    assert [(a.name, a.content_type, a.data) for a in listed] == [
        ("blob.bin", "application/octet-stream", None),
        ("reports/summary.md", "text/markdown", None),
    ]


def test_a_refused_commit_leaves_no_artifact_behind(env):
    # Given a state whose lease was lost before it committed its artefact
    run_id = env.start(linear)
    claim = env.claim(run_id)
    env.store.commit(claim, move("second"), worker="w1")
    writes: list = []
    artifacts(env, claim, writes).put("late", "zombie output")

    # When its commit is fenced off
    assert env.store.commit(claim, move("second"), worker="w1", callbacks=writes) is None

    # Then nothing of it was written
    with pytest.raises(errors.ArtifactNotFound):
        env.store.get_artifact(run_id, "late")
    assert env.store.get_run(run_id).artifacts == ()


def test_a_later_put_of_the_same_name_replaces_it_and_old_references_fail(env):
    run_id = env.start(linear)
    first = env.claim(run_id)
    writes: list = []
    old_ref = artifacts(env, first, writes).put("draft", "version one")
    env.store.commit(first, move("second"), worker="w1", callbacks=writes)
    second = env.claim(run_id, 2)
    writes = []
    new_ref = artifacts(env, second, writes).put("draft", "version two")
    env.store.commit(second, move("third"), worker="w1", callbacks=writes)

    reader = artifacts(env, env.claim(run_id, 3), [])
    assert reader.get_text(new_ref) == reader.get_text("draft") == "version two"
    with pytest.raises(errors.ArtifactNotFound, match="replaced since reference"):
        reader.get(old_ref)


def test_a_branch_puts_artifacts_with_its_commit(env):
    run_id, group_id = forked(env)
    branch = claim_branch(env, group_id, 0)
    writes: list = []
    ref = artifacts(env, branch, writes).put("page-0", b"\x00\xffbinary")
    assert env.store.commit_branch(group_id, 0, branch.lease_token, done(ref), callbacks=writes)
    got = env.store.get_artifact(run_id, "page-0")
    assert (got.data, got.state, got.step_seq) == (b"\x00\xffbinary", "leg", None)


def test_unknown_artifacts_and_runs_are_named_in_the_error(env):
    run_id = env.start(linear)
    with pytest.raises(errors.ArtifactNotFound) as missing:
        env.store.get_artifact(run_id, "nothing")
    assert missing.value.code == "E-ARTIFACT-NOT-FOUND" and "'nothing'" in str(missing.value)
    with pytest.raises(errors.RunNotFound):
        env.store.get_artifact("00000000-0000-4000-8000-000000000000", "x")
    with pytest.raises(errors.RunNotFound):
        env.store.get_artifact("not-a-uuid", "x")


@pytest.mark.parametrize("name", ["", "/abs", "a@b", "sp ace", "x" * 201, "né", 7])
def test_invalid_names_and_data_are_refused_at_put(env, name):
    run_id = env.start(linear)
    arts = artifacts(env, env.claim(run_id), [])
    with pytest.raises(errors.InvalidArtifact):
        arts.put(name, "data")
    with pytest.raises(errors.InvalidArtifact, match="bytes or str"):
        arts.put("ok", {"not": "bytes"})  # type: ignore[arg-type]


def test_an_artifact_over_its_limit_is_refused_naming_the_setting(env):
    run_id = env.start(linear)
    claim = env.claim(run_id)
    arts = Artifacts(env.store, run_id, claim.state, 1, sink=[], limit=100)
    with pytest.raises(errors.PayloadTooLarge, match=r"LEASEFLOW_MAX_ARTIFACT_BYTES") as big:
        arts.put("big", b"x" * 101)
    assert (big.value.size, big.value.limit) == (101, 100)
