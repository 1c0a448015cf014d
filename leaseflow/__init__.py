"""leaseflow: durable finite-state workflows on Celery, fenced by PostgreSQL leases."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from leaseflow.errors import (
    ArtifactNotFound,
    IdempotencyConflict,
    InvalidArtifact,
    InvalidDefinition,
    InvalidInput,
    InvalidSignal,
    LeaseflowError,
    LeaseLost,
    PayloadTooLarge,
    RunActive,
    RunCompleted,
    RunFinished,
    RunNotFound,
    UnknownWorkflow,
)
from leaseflow.fsm.definition import Workflow
from leaseflow.fsm.outcomes import Complete, Failed, Map, Next, Parallel, Wait
from leaseflow.fsm.retry import Retry
from leaseflow.types import RunStatus

if TYPE_CHECKING:
    from leaseflow.client import Client, RunView
    from leaseflow.context import StateContext as Context
    from leaseflow.store.records import CancelResult, SignalReceipt

__version__ = "0.1.0"

__all__ = [
    "ArtifactNotFound",
    "CancelResult",
    "Client",
    "Complete",
    "Context",
    "Failed",
    "IdempotencyConflict",
    "InvalidArtifact",
    "InvalidDefinition",
    "InvalidInput",
    "InvalidSignal",
    "LeaseLost",
    "LeaseflowError",
    "Map",
    "Next",
    "Parallel",
    "PayloadTooLarge",
    "Retry",
    "RunActive",
    "RunCompleted",
    "RunFinished",
    "RunNotFound",
    "RunStatus",
    "RunView",
    "SignalReceipt",
    "UnknownWorkflow",
    "Wait",
    "Workflow",
]


def __getattr__(name: str) -> Any:
    # The client pulls in Celery; load it only when asked for.
    if name in ("Client", "RunView"):
        from leaseflow import client

        return getattr(client, name)
    if name in ("SignalReceipt", "CancelResult"):
        from leaseflow.store import records

        return getattr(records, name)
    if name == "Context":
        from leaseflow import context

        return context.StateContext
    raise AttributeError(f"module 'leaseflow' has no attribute {name!r}")
