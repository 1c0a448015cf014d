"""Resource locks on ``leaseflow.testing``: contention, hold_lock_until, fences,
``locks.hold`` from code, a crashed holder swept once its lease expires, and the
definition errors."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel

from leaseflow import Complete, Workflow, errors, locks
from leaseflow.testing import Engine, engine


class Job(BaseModel):
    tenant: str = "acme"
    fences: list[int] = []


def indexer(name: str = "t_indexer") -> Workflow:
    """reindex holds "index:{tenant}" through publish (hold_lock_until)."""
    wf = Workflow(name, context=Job, register=False)

    @wf.state(initial=True, to=["publish"], lock="index:{tenant}", hold_lock_until="publish")
    def reindex(ctx: Any) -> str:
        ctx.data.fences.append(ctx.lock_token)
        return "publish"

    @wf.state(to=["done"])
    def publish(ctx: Any) -> str:
        ctx.data.fences.append(ctx.lock_token)
        return "done"

    @wf.state()
    def done(ctx: Any) -> Complete:
        return Complete(output={"fences": ctx.data.fences, "lock": ctx.lock_token})

    return wf


def held(eng: Engine) -> list[tuple[str, str | None]]:
    return [(lock.key, lock.holder_state) for lock in eng.store.list_locks()]


def test_a_lock_is_held_across_states_until_the_named_one():
    wf = indexer()
    with engine() as eng:
        run_id = eng.start(wf)
        eng.run_until_idle()
        run = eng.get(run_id)
        assert run.output == {"fences": [1, 1], "lock": None}  # held by both, then freed
        assert held(eng) == []


def test_runs_contending_for_one_key_take_turns_with_growing_fences():
    wf = indexer()
    with engine() as eng:
        runs = [eng.start(wf) for _ in range(3)]
        other = eng.start(wf, {"tenant": "globex"})  # another key: no contention
        eng.run_until_idle()
        eng.advance(5)  # the deferred ones come due after their pause

        fences = sorted(eng.get(r).output["fences"][0] for r in runs)
        assert fences == [1, 2, 3]
        assert eng.get(other).output["fences"] == [1, 1]
        assert all(eng.get(r).attempt == 1 for r in runs)  # no attempt spent waiting
        assert [r.result for r in eng.results].count("deferred") >= 2


def test_a_lock_held_by_code_makes_the_state_wait_then_run():
    wf = indexer()
    with engine() as eng:
        with locks.hold("index:acme", holder="maintenance", ttl=30, store=eng.store) as lock:
            run_id = eng.start(wf)
            eng.run_until_idle()
            assert eng.get(run_id).status == "pending"  # deferred, not failed
            assert lock.token == 1
            other = locks.hold("index:acme", holder="other", store=eng.store)
            with pytest.raises(errors.LockHeld, match="maintenance"), other:
                pass  # pragma: no cover - never entered
        eng.advance(1)
        assert eng.get(run_id).output["fences"] == [2, 2]


def test_a_crashed_holder_s_lock_is_swept_once_its_lease_expires():
    wf = indexer()
    with engine(lease_ttl=10) as eng:
        eng.crash_next("reindex")
        crashed = eng.start(wf)
        waiting = eng.start(wf)
        eng.run_until_idle()
        assert held(eng) == [("index:acme", "reindex")]

        eng.advance(60)  # the lease and the lock expire; swept, reaped, re-run

        assert {eng.get(r).status for r in (crashed, waiting)} == {"completed"}
        (audit,) = eng.store.lock_audit("index:acme")
        assert (audit.action, audit.holder_run) == ("expired", crashed)
        assert held(eng) == []


def test_bad_lock_definitions_are_refused():
    wf = Workflow("t_bad_lock", context=Job, register=False)

    @wf.state(initial=True, to=["b"], lock="index:{tenannt}", hold_lock_until="nowhere")
    def a(ctx: Any) -> str:
        return "b"

    @wf.state(lock="x", inline=True)
    def b(ctx: Any) -> Complete:
        return Complete()

    with pytest.raises(errors.InvalidDefinition) as info:
        wf.validate()
    text = str(info.value)
    assert "{tenannt}: not a field of the context Job" in text
    assert "unknown state 'nowhere' in hold_lock_until" in text
    assert "both inline= and lock=" in text


def test_locks_hold_refuses_bad_arguments():
    with engine() as eng:
        bad_ttl = locks.hold("k", holder="me", ttl=-1, store=eng.store)
        with pytest.raises(ValueError, match="ttl"), bad_ttl:
            pass  # pragma: no cover
        no_key = locks.hold("", holder="me", store=eng.store)
        with pytest.raises(ValueError, match="key"), no_key:
            pass  # pragma: no cover


def test_an_empty_key_field_fails_the_state_with_e_lock_key():
    wf = indexer("t_indexer_empty")
    with engine() as eng:
        run_id = eng.start(wf, {"tenant": ""})
        eng.run_until_idle()
        run = eng.get(run_id)
        assert (run.status, run.error_code) == ("failed", "E-LOCK-KEY")
        assert "'tenant' is empty" in (run.error or "")
