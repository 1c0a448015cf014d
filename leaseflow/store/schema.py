"""The tables, as SQLAlchemy Core metadata (Alembic migrations must match it).

Heartbeat-updated columns (``lf_runs.lease_expires_at``, ``lf_workers.last_seen_at``)
are kept out of every index so heartbeats stay HOT updates.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    DateTime,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

STATUSES = ("pending", "running", "waiting", "completed", "failed", "cancelled", "timed_out")
ACTIVE = ("pending", "running", "waiting")
_ts = DateTime(timezone=True)

workflows = Table(
    "lf_workflows",
    metadata,
    Column("name", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("digest", Text, nullable=False),
    Column("definition", JSONB, nullable=False),
    Column("registered_at", _ts, nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("name", "version"),
)

transitions = Table(
    "lf_transitions",
    metadata,
    Column("workflow", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("from_state", Text, nullable=False),  # '' is the entry into the initial state
    Column("to_state", Text, nullable=False),
    PrimaryKeyConstraint("workflow", "version", "from_state", "to_state"),
)

runs = Table(
    "lf_runs",
    metadata,
    Column("id", UUID(as_uuid=False), nullable=False),
    Column("workflow", Text, nullable=False),
    Column("version", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("prev_state", Text),
    Column("status", Text, nullable=False, server_default="pending"),
    Column("step_seq", Integer, nullable=False, server_default="1"),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False, server_default="1"),
    Column("lease_token", UUID(as_uuid=False)),
    Column("lease_owner", Text),
    Column("lease_expires_at", _ts),
    Column("claimed_at", _ts),
    Column("not_before", _ts, nullable=False, server_default=func.now()),
    Column("redispatch_at", _ts, nullable=False, server_default=func.now()),
    Column("checkpoint", LargeBinary, nullable=False),
    Column("context_version", Integer, nullable=False, server_default="1"),
    Column("input", JSONB, nullable=False),
    Column("output", JSONB),
    Column("error_code", Text),
    Column("error", Text),
    Column("idempotency_key", Text),
    Column("parent_run_id", UUID(as_uuid=False)),
    Column("group_id", BigInteger),
    Column("wait_event", Text),
    Column("wait_deadline", _ts),
    #: What a waiting run waits for: its next state and where a timeout sends it.
    Column("wait", JSONB),
    #: The payload of the signal that resumed the run (``ctx.signal``), until it moves on.
    Column("signal", JSONB),
    Column("run_deadline", _ts),
    Column("cancel_requested", Boolean, nullable=False, server_default=text("false")),
    Column("cancel_reason", Text),
    Column("priority", SmallInteger, nullable=False, server_default="0"),
    #: The resource lock the run holds (its key and acquisition token), and the state
    #: whose commit releases it (None: the state that took it).
    Column("lock_key", Text),
    Column("lock_token", UUID(as_uuid=False)),
    Column("lock_until", Text),
    #: Row-level security scopes a tenant's client and API requests to its own runs;
    #: every row hanging off a run carries its run's tenant.
    Column("tenant", Text, nullable=False, server_default="default"),
    Column("created_at", _ts, nullable=False, server_default=func.now()),
    Column("updated_at", _ts, nullable=False, server_default=func.now()),
    Column("finished_at", _ts),
    PrimaryKeyConstraint("id"),
    CheckConstraint(f"status IN {STATUSES!r}", name="status"),
    CheckConstraint("step_seq >= 1 AND attempt >= 0 AND max_attempts >= 1", name="counters"),
    CheckConstraint("status <> 'running' OR lease_token IS NOT NULL", name="running_has_lease"),
    CheckConstraint("priority BETWEEN 0 AND 9", name="priority"),
    # Beat scans find in-flight runs here. Neither the column nor the predicate changes
    # while a run is in flight, so claims, commits and heartbeats stay HOT updates.
    Index("ix_lf_runs_unfinished", "created_at", postgresql_where=text("finished_at IS NULL")),
    Index("ix_lf_runs_created_at", "created_at"),
    # The timeout sweeper's scans: columns set when a wait or a run starts, never by a step.
    Index(
        "ix_lf_runs_wait_deadline",
        "wait_deadline",
        postgresql_where=text("wait_deadline IS NOT NULL"),
    ),
    Index(
        "ix_lf_runs_run_deadline",
        "run_deadline",
        postgresql_where=text("finished_at IS NULL AND run_deadline IS NOT NULL"),
    ),
    Index("ix_lf_runs_workflow_created_at", "workflow", "created_at"),
    Index("ix_lf_runs_tenant_created_at", "tenant", "created_at", "id"),
    # Retention finds finished runs by age; set once, when a run finishes.
    Index("ix_lf_runs_finished", "finished_at", postgresql_where=text("finished_at IS NOT NULL")),
    Index(
        "uq_lf_runs_idempotency",
        "tenant",
        "workflow",
        "idempotency_key",
        unique=True,
        postgresql_where=text("idempotency_key IS NOT NULL"),
    ),
)

steps = Table(
    "lf_steps",
    metadata,
    Column("run_id", UUID(as_uuid=False), nullable=False),
    Column("seq", Integer, nullable=False),
    Column("state", Text, nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("lease_token", UUID(as_uuid=False)),
    Column("worker", Text),
    Column("started_at", _ts),
    Column("finished_at", _ts, nullable=False, server_default=func.now()),
    Column("duration_ms", Integer),
    Column("outcome", Text, nullable=False),
    Column("next_state", Text),
    Column("error", Text),
    #: The context's JSON and its stored checkpoint, in bytes, when the commit wrote one.
    Column("context_bytes", Integer),
    Column("checkpoint_bytes", Integer),
    Column("tenant", Text, nullable=False),
    PrimaryKeyConstraint("run_id", "seq"),
)

groups = Table(
    "lf_groups",
    metadata,
    Column("id", BigInteger, Identity(), nullable=False),
    Column("run_id", UUID(as_uuid=False), nullable=False),
    Column("parent_seq", Integer, nullable=False),
    Column("parent_state", Text, nullable=False),
    Column("join_state", Text, nullable=False),
    Column("join_max_attempts", Integer, nullable=False),
    Column("kind", Text, nullable=False),
    Column("width", Integer, nullable=False),
    Column("done", Integer, nullable=False, server_default="0"),
    Column("failed", Integer, nullable=False, server_default="0"),
    Column("on_branch_error", Text, nullable=False),
    Column("max_concurrency", Integer),
    Column("chord", Boolean, nullable=False, server_default=text("false")),
    Column("checkpoint", LargeBinary, nullable=False),
    Column("context_version", Integer, nullable=False),
    Column("status", Text, nullable=False, server_default="running"),
    Column("created_at", _ts, nullable=False, server_default=func.now()),
    Column("closed_at", _ts),
    Column("tenant", Text, nullable=False),
    PrimaryKeyConstraint("id"),
    UniqueConstraint("run_id", "parent_seq"),
    CheckConstraint("status IN ('running', 'joined', 'failed', 'cancelled')", name="status"),
    CheckConstraint("kind IN ('parallel', 'map')", name="kind"),
    CheckConstraint("done >= 0 AND failed >= 0 AND done + failed <= width", name="counters"),
)

BRANCH_STATUSES = ("held", "pending", "running", "completed", "failed", "cancelled")

branches = Table(
    "lf_branches",
    metadata,
    Column("group_id", BigInteger, nullable=False),
    Column("idx", Integer, nullable=False),
    Column("run_id", UUID(as_uuid=False), nullable=False),
    Column("state", Text, nullable=False),
    Column("status", Text, nullable=False),
    Column("attempt", Integer, nullable=False, server_default="0"),
    Column("max_attempts", Integer, nullable=False),
    Column("lease_token", UUID(as_uuid=False)),
    Column("lease_owner", Text),
    Column("lease_expires_at", _ts),
    Column("claimed_at", _ts),
    Column("not_before", _ts, nullable=False, server_default=func.now()),
    Column("redispatch_at", _ts, nullable=False, server_default=func.now()),
    Column("item", JSONB),
    Column("result", JSONB),
    Column("error", Text),
    Column("finished_at", _ts),
    Column("tenant", Text, nullable=False),
    PrimaryKeyConstraint("group_id", "idx"),
    CheckConstraint(f"status IN {BRANCH_STATUSES!r}", name="status"),
    CheckConstraint("status <> 'running' OR lease_token IS NOT NULL", name="running_has_lease"),
    Index("ix_lf_branches_unfinished", "group_id", postgresql_where=text("finished_at IS NULL")),
)

#: What states put with ``ctx.artifacts.put``: zstd-compressed, one row per run and name,
#: written in the state's fenced commit.
artifacts = Table(
    "lf_artifacts",
    metadata,
    Column("run_id", UUID(as_uuid=False), nullable=False),
    Column("name", Text, nullable=False),
    Column("content_type", Text),
    Column("codec", SmallInteger, nullable=False),
    Column("data", LargeBinary, nullable=False),
    Column("size_bytes", BigInteger, nullable=False),
    Column("stored_bytes", BigInteger, nullable=False),
    Column("sha256", Text, nullable=False),
    Column("state", Text),
    Column("step_seq", Integer),
    Column("created_at", _ts, nullable=False, server_default=func.now()),
    Column("tenant", Text, nullable=False),
    PrimaryKeyConstraint("run_id", "name"),
)

#: The HTTP API's bearer tokens: an scrypt hash of the secret part, never the token.
tokens = Table(
    "lf_tokens",
    metadata,
    Column("id", Text, nullable=False),
    Column("name", Text, nullable=False),
    Column("tenant", Text, nullable=False),
    Column("admin", Boolean, nullable=False, server_default=text("false")),
    Column("hash", Text, nullable=False),
    Column("created_at", _ts, nullable=False, server_default=func.now()),
    Column("last_used_at", _ts),
    Column("revoked_at", _ts),
    PrimaryKeyConstraint("id"),
    Index("uq_lf_tokens_name", "name", unique=True, postgresql_where=text("revoked_at IS NULL")),
)

#: Every signal sent to a run, once per ``(run_id, signal_id)``: stored even when the
#: run does not wait for it yet, consumed by the Wait that asks for its event.
signals = Table(
    "lf_signals",
    metadata,
    Column("id", BigInteger, Identity(), nullable=False),
    Column("run_id", UUID(as_uuid=False), nullable=False),
    Column("signal_id", Text, nullable=False),
    Column("event", Text, nullable=False),
    Column("payload", JSONB),
    Column("received_at", _ts, nullable=False, server_default=func.now()),
    Column("consumed_at", _ts),
    Column("consumed_seq", Integer),
    Column("tenant", Text, nullable=False),
    PrimaryKeyConstraint("id"),
    UniqueConstraint("run_id", "signal_id"),
    Index(
        "ix_lf_signals_unconsumed",
        "run_id",
        "event",
        "id",
        postgresql_where=text("consumed_at IS NULL"),
    ),
)

#: One row per key ever locked: the fence only grows, across holders; held while
#: ``token`` is set. ``expires_at`` is refreshed by heartbeats: in no index.
locks = Table(
    "lf_locks",
    metadata,
    Column("key", Text, nullable=False),
    Column("fence", BigInteger, nullable=False, server_default="0"),
    Column("token", UUID(as_uuid=False)),
    Column("holder", Text),
    Column("holder_run", UUID(as_uuid=False)),
    Column("holder_state", Text),
    Column("acquired_at", _ts),
    Column("expires_at", _ts),
    Column("released_at", _ts),
    PrimaryKeyConstraint("key"),
    CheckConstraint("token IS NULL OR expires_at IS NOT NULL", name="held_expires"),
    Index("ix_lf_locks_held", "key", postgresql_where=text("token IS NOT NULL")),
)

#: Every lock freed by someone other than its holder: swept once expired, or forced.
lock_audit = Table(
    "lf_lock_audit",
    metadata,
    Column("id", BigInteger, Identity(), nullable=False),
    Column("key", Text, nullable=False),
    Column("fence", BigInteger, nullable=False),
    Column("action", Text, nullable=False),
    Column("holder", Text),
    Column("holder_run", UUID(as_uuid=False)),
    Column("token", UUID(as_uuid=False)),
    Column("actor", Text),
    Column("reason", Text),
    Column("at", _ts, nullable=False, server_default=func.now()),
    PrimaryKeyConstraint("id"),
    CheckConstraint("action IN ('expired', 'forced')", name="action"),
    Index("ix_lf_lock_audit_key", "key", "id"),
)

#: One row per broker queue the dispatcher has probed. A probe message sent at
#: ``probe_sent_at`` travels the queue behind every message published before it; the
#: worker that consumes it raises ``passed_at`` to that time. Only an overdue message
#: published before ``passed_at`` is known to be gone rather than waiting in a backlog.
queue_marks = Table(
    "lf_queue_marks",
    metadata,
    Column("queue", Text, nullable=False),
    Column("probe_sent_at", _ts),
    Column("passed_at", _ts),
    PrimaryKeyConstraint("queue"),
)

workers = Table(
    "lf_workers",
    metadata,
    Column("id", Text, nullable=False),
    Column("hostname", Text, nullable=False),
    Column("pid", Integer, nullable=False),
    Column("started_at", _ts, nullable=False, server_default=func.now()),
    Column("last_seen_at", _ts, nullable=False, server_default=func.now()),
    Column("leases_lost", BigInteger, nullable=False, server_default="0"),
    #: The worker's queues (comma-separated) and pool size, leases held at its last
    #: heartbeat, and whether beat found it dead (it stopped checking in).
    Column("queues", Text),
    Column("concurrency", Integer),
    Column("leases_held", Integer, nullable=False, server_default="0"),
    Column("status", Text, nullable=False, server_default="alive"),
    PrimaryKeyConstraint("id"),
    CheckConstraint("status IN ('alive', 'dead')", name="status"),
)
