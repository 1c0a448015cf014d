"""The one exception tree of leaseflow, and the stable error codes.

Runs fail with the ``E-...`` codes below (``lf_runs.error_code``). Every exception
also carries a stable ``code`` (the CLI prints ``error[<code>]: ...`` and the HTTP
API will return it), and rebuilds from its ``args`` so that it survives pickling
across Celery processes. Codes are added here as the engine learns to fail with them.
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence

LEASE_EXPIRED = "E-LEASE-EXPIRED"
ILLEGAL_TRANSITION = "E-ILLEGAL-TRANSITION"
UNKNOWN_STATE = "E-UNKNOWN-STATE"
STATE_ERROR = "E-STATE-ERROR"
BRANCH_FAILED = "E-BRANCH-FAILED"
CONTEXT_INVALID = "E-CONTEXT-INVALID"
CHECKPOINT_CORRUPT = "E-CHECKPOINT-CORRUPT"
CHECKPOINT_STALE = "E-CHECKPOINT-STALE"
PAYLOAD_TOO_LARGE = "E-PAYLOAD-TOO-LARGE"
WAIT_TIMEOUT = "E-WAIT-TIMEOUT"
RUN_TIMEOUT = "E-RUN-TIMEOUT"
CANCELLED = "E-CANCELLED"


class LeaseflowError(Exception):
    """Root of every error leaseflow raises."""

    code = "E-LEASEFLOW"


class ConfigurationError(LeaseflowError):
    """A setting is missing or malformed."""

    code = "E-CONFIG"


class InvalidDefinition(LeaseflowError):
    """A workflow definition is malformed; ``problems`` maps each state to what is wrong."""

    code = "E-DEFINITION"

    def __init__(self, workflow: str, problems: dict[str, list[str]]) -> None:
        super().__init__(workflow, problems)
        self.workflow = workflow
        self.problems = problems

    def __str__(self) -> str:
        lines = [f"workflow {self.workflow!r} is invalid:"]
        for state, issues in sorted(self.problems.items()):
            for issue in issues:
                lines.append(f"  - {state}: {issue}")
        return "\n".join(lines)


class UnknownWorkflow(LeaseflowError):
    """No workflow of that name (and version) is registered in this process; ``known``
    lists those that are (``name``, or ``name vN`` when a version was asked for)."""

    code = "E-UNKNOWN-WORKFLOW"

    def __init__(self, name: str, version: int | None = None, known: Sequence[str] = ()) -> None:
        super().__init__(name, version, tuple(known))
        self.name = name
        self.version = version
        self.known = tuple(known)

    def __str__(self) -> str:
        which = self.name if self.version is None else f"{self.name} v{self.version}"
        close = difflib.get_close_matches(which, self.known, n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        listed = ", ".join(self.known) if self.known else "none"
        return (
            f"unknown workflow {which!r}: {hint}this process knows: {listed}. "
            "Is its module listed in LEASEFLOW_WORKFLOWS and imported by this process?"
        )


class UnknownState(LeaseflowError):
    """The workflow has no state of that name."""

    code = UNKNOWN_STATE

    def __init__(self, workflow: str, state: str) -> None:
        super().__init__(workflow, state)
        self.workflow = workflow
        self.state = state

    def __str__(self) -> str:
        return f"workflow {self.workflow!r} has no state {self.state!r}"


class InvalidInput(LeaseflowError):
    """The input of a new run does not validate against the workflow's context model."""

    code = CONTEXT_INVALID

    def __init__(self, workflow: str, detail: str) -> None:
        super().__init__(workflow, detail)
        self.workflow = workflow
        self.detail = detail

    def __str__(self) -> str:
        return f"invalid input for workflow {self.workflow!r}: {self.detail}"


class PayloadTooLarge(LeaseflowError):
    """A value's JSON exceeds its limit (``setting``: ``LEASEFLOW_MAX_PAYLOAD_BYTES`` for
    inputs, outputs, branch results, Map items and signal payloads,
    ``LEASEFLOW_MAX_CHECKPOINT_BYTES`` for contexts, ``LEASEFLOW_MAX_ARTIFACT_BYTES``)."""

    code = PAYLOAD_TOO_LARGE

    def __init__(self, what: str, size: int, limit: int, setting: str | None = None) -> None:
        super().__init__(what, size, limit, setting)
        self.what = what
        self.size = size
        self.limit = limit
        self.setting = setting

    def __str__(self) -> str:
        named = f" ({self.setting})" if self.setting else ""
        return f"{self.what} is {self.size} bytes, over the limit of {self.limit} bytes{named}"


class IdempotencyConflict(LeaseflowError):
    """An idempotency key was reused with a different input."""

    code = "E-IDEMPOTENCY-CONFLICT"

    def __init__(self, workflow: str, key: str, run_id: str) -> None:
        super().__init__(workflow, key, run_id)
        self.workflow = workflow
        self.key = key
        self.run_id = run_id

    def __str__(self) -> str:
        return (
            f"idempotency key {self.key!r} of workflow {self.workflow!r} already names run "
            f"{self.run_id} with a different input"
        )


class RunExists(LeaseflowError):
    """A new run was given an id that another run has (or that is no UUID)."""

    code = "E-RUN-EXISTS"

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id

    def __str__(self) -> str:
        return f"cannot create run {self.run_id!r}: the id is taken or is not a UUID"


class RunNotFound(LeaseflowError):
    """No run has that id."""

    code = "E-RUN-NOT-FOUND"

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id

    def __str__(self) -> str:
        return f"no run {self.run_id}"


class LeaseLost(LeaseflowError):
    """This process no longer holds the lease of the run: its write was fenced off."""

    code = "E-LEASE-LOST"

    def __init__(self, run_id: str, token: str) -> None:
        super().__init__(run_id, token)
        self.run_id = run_id
        self.token = token

    def __str__(self) -> str:
        return f"lease {self.token} on run {self.run_id} is lost"


class CheckpointError(LeaseflowError):
    """A checkpoint cannot be decoded (corrupt) or is of a newer schema than this code."""

    def __init__(self, code: str, detail: str) -> None:
        super().__init__(code, detail)
        self.code = code
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.code}: {self.detail}"


class IllegalTransition(LeaseflowError):
    """The store refused a write along an edge the workflow does not declare."""

    code = ILLEGAL_TRANSITION

    def __init__(self, run_id: str, from_state: str, to_state: str) -> None:
        super().__init__(run_id, from_state, to_state)
        self.run_id = run_id
        self.from_state = from_state
        self.to_state = to_state

    def __str__(self) -> str:
        return (
            f"run {self.run_id}: {self.from_state!r} -> {self.to_state!r} is not a "
            "registered transition"
        )


class StoreUnavailable(LeaseflowError):
    """The database could not be reached or dropped the connection."""

    code = "E-STORE-UNAVAILABLE"


class SchemaMissing(LeaseflowError):
    """The database has no leaseflow tables (or an older schema): run the migrations."""

    code = "E-DB-NOT-MIGRATED"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return f"the database has no leaseflow schema ({self.detail}); run `leaseflow db upgrade`"


class UnstorableValue(LeaseflowError):
    """A value the store cannot take (a NUL byte, nesting too deep, a value PostgreSQL
    refuses): the step fails with its cause instead of retrying a doomed commit."""

    code = STATE_ERROR

    def __init__(self, what: str, detail: str) -> None:
        super().__init__(what, detail)
        self.what = what
        self.detail = detail

    def __str__(self) -> str:
        return f"{self.what} cannot be stored: {self.detail}"


class InCommitError(LeaseflowError):
    """A ``ctx.in_commit`` callback raised: the transition was rolled back with it."""

    code = "E-IN-COMMIT"

    def __init__(self, run_id: str, detail: str) -> None:
        super().__init__(run_id, detail)
        self.run_id = run_id
        self.detail = detail

    def __str__(self) -> str:
        return f"in_commit callback of run {self.run_id} failed: {self.detail}"


class RunFinished(LeaseflowError):
    """The run has finished: it takes no more signals."""

    code = "E-RUN-FINISHED"

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(run_id, status)
        self.run_id = run_id
        self.status = status

    def __str__(self) -> str:
        return f"run {self.run_id} is {self.status}: it takes no more signals"


class RunActive(LeaseflowError):
    """Only a finished run (failed, cancelled, timed out) can be re-driven."""

    code = "E-RUN-ACTIVE"

    def __init__(self, run_id: str, status: str) -> None:
        super().__init__(run_id, status)
        self.run_id = run_id
        self.status = status

    def __str__(self) -> str:
        return (
            f"run {self.run_id} is {self.status}: only a failed, cancelled or timed-out run "
            "can be retried (cancel it first)"
        )


class RunNotFinished(RunActive):
    """An active run (pending, running, waiting) is purged only with ``force``."""

    def __str__(self) -> str:
        return f"run {self.run_id} is {self.status}: cancel it first or purge with --force"


class RunCompleted(LeaseflowError):
    """A completed run cannot be re-driven: start a new run instead."""

    code = "E-RUN-COMPLETED"

    def __init__(self, run_id: str) -> None:
        super().__init__(run_id)
        self.run_id = run_id

    def __str__(self) -> str:
        return f"run {self.run_id} completed: nothing to retry (start a new run instead)"


class InvalidSignal(LeaseflowError):
    """A signal's event name or payload is malformed."""

    code = "E-SIGNAL-INVALID"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return f"invalid signal: {self.detail}"


LOCK_KEY = "E-LOCK-KEY"


class InvalidLockKey(LeaseflowError):
    """A state's ``lock=`` template cannot be formatted from the run's context."""

    code = LOCK_KEY

    def __init__(self, template: str, detail: str) -> None:
        super().__init__(template, detail)
        self.template = template
        self.detail = detail

    def __str__(self) -> str:
        return f"lock key {self.template!r}: {self.detail}"


class LockHeld(LeaseflowError):
    """The lock is held by someone else (``locks.hold`` with no wait left)."""

    code = "E-LOCK-HELD"

    def __init__(self, key: str, holder: str | None, since: object) -> None:
        super().__init__(key, holder, since)
        self.key = key
        self.holder = holder
        self.since = since

    def __str__(self) -> str:
        return f"lock {self.key!r} is held by {self.holder or 'someone'} since {self.since}"


class LockNotFound(LeaseflowError):
    """No lock of that key is held."""

    code = "E-LOCK-NOT-FOUND"

    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key

    def __str__(self) -> str:
        return f"no lock {self.key!r} is held"


ARTIFACT_NOT_FOUND = "E-ARTIFACT-NOT-FOUND"


class ArtifactNotFound(LeaseflowError):
    """The run has no artefact of that name (or it was replaced since the reference)."""

    code = ARTIFACT_NOT_FOUND

    def __init__(self, run_id: str, name: str, reason: str = "") -> None:
        super().__init__(run_id, name, reason)
        self.run_id = run_id
        self.name = name
        self.reason = reason

    def __str__(self) -> str:
        why = f": {self.reason}" if self.reason else ""
        return f"run {self.run_id} has no artifact {self.name!r}{why}"


class InvalidArtifact(LeaseflowError, ValueError):
    """An artefact name, reference or data that cannot be stored."""

    code = "E-ARTIFACT-INVALID"

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail

    def __str__(self) -> str:
        return self.detail
