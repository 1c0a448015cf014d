"""Prometheus metrics of the engine (per process; see the prometheus-client docs for
multi-process collection under Celery's prefork pool)."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

CLAIMS = Counter(
    "leaseflow_claims_total", "Claim attempts by result", ["result"]
)  # claimed, inline (handed over), idle, deferred, version_unknown, lock_contended
STEPS = Counter("leaseflow_steps_total", "Committed steps by outcome", ["outcome"])
LEASES_LOST = Counter("leaseflow_leases_lost_total", "Commits refused because the lease was lost")
REAPED = Counter("leaseflow_runs_reaped_total", "Runs whose lease expired, by result", ["result"])
REDISPATCHED = Counter("leaseflow_runs_redispatched_total", "Pending runs re-published by beat")
QUEUE_PROBES = Counter(
    "leaseflow_queue_probes_total", "Probes sent through a queue before re-publishing"
)
WORKERS_REAPED = Counter("leaseflow_workers_reaped_total", "Workers found dead by beat")
RELEASED = Counter("leaseflow_leases_released_total", "Leases a worker shutting down handed back")
REGATHERED = Counter(
    "leaseflow_checkpoints_regathered_total",
    "Stale checkpoints (no upcaster path) sent to the workflow's regather state",
)
LOCKS_SWEPT = Counter("leaseflow_locks_swept_total", "Expired resource locks freed by beat")
STEP_SECONDS = Histogram(
    "leaseflow_step_duration_seconds", "Time a state function ran", ["workflow", "state"]
)
CLAIM_SECONDS = Histogram("leaseflow_claim_duration_seconds", "Claim statement latency")
