"""A run's context in and out of its checkpoint: the first one, from the run's input;
loading one, upgraded through the workflow's upcasters when it is older. Pure."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pydantic
import pydantic_core

from leaseflow import errors
from leaseflow.fsm import checkpoint
from leaseflow.fsm.definition import Workflow

if TYPE_CHECKING:
    from leaseflow.fsm.limits import Limits

__all__ = ["first_checkpoint", "load_context"]


def load_context(wf: Workflow, blob: bytes, version: int) -> pydantic.BaseModel:
    """The run's context from its checkpoint, upgraded by the workflow's upcasters when it
    is older; ``CheckpointError`` when this code cannot read it (``E-CHECKPOINT-STALE``:
    older with no upcaster path; ``E-CHECKPOINT-CORRUPT``: newer, damaged, or an upcaster
    failed or produced data the context model refuses, or a checkpoint of the current
    version no longer validates: the model changed without a new ``context_version``)."""
    if version > wf.context_version:
        raise errors.CheckpointError(
            errors.CHECKPOINT_CORRUPT,
            f"checkpoint has context version {version}, newer than "
            f"this worker's {wf.context_version}",
        )
    data = checkpoint.decode(blob)
    if version == wf.context_version:
        try:
            return wf.context.model_validate(data)
        except pydantic.ValidationError as exc:
            raise errors.CheckpointError(
                errors.CHECKPOINT_CORRUPT,
                f"the checkpoint (context version {version}) does not validate against "
                f"{wf.context.__name__}: {exc} (if the model changed, raise the workflow's "
                "context_version and register an upcaster)",
            ) from exc
    start = version
    while version < wf.context_version:
        upcast = wf.upcasters.get(version)
        if upcast is None:
            raise errors.CheckpointError(
                errors.CHECKPOINT_STALE,
                f"checkpoint has context version {start}, older than this worker's "
                f"{wf.context_version}, and no upcaster goes from version {version}",
            )
        try:
            data = upcast(data)
        except Exception as exc:
            raise errors.CheckpointError(
                errors.CHECKPOINT_CORRUPT, f"the upcaster from version {version} raised {exc!r}"
            ) from exc
        if not isinstance(data, dict):
            raise errors.CheckpointError(
                errors.CHECKPOINT_CORRUPT,
                f"the upcaster from version {version} returned {type(data).__name__}, not a dict",
            )
        version += 1
    try:
        return wf.context.model_validate(data)
    except pydantic.ValidationError as exc:
        raise errors.CheckpointError(
            errors.CHECKPOINT_CORRUPT,
            f"the checkpoint upgraded from version {start} does not validate: {exc}",
        ) from exc


def first_checkpoint(
    wf: Workflow, input: dict[str, Any] | None, limits: Limits
) -> tuple[bytes, dict[str, Any]]:
    """The validated input of a new run and its first checkpoint; ``InvalidInput``
    (naming what is wrong) when the input is not a JSON object of the context model, or
    holds what the store cannot take (``checkpoint.check``, naming the field)."""
    payload = {} if input is None else input
    if not isinstance(payload, dict):
        raise errors.InvalidInput(
            wf.name, f"input must be a JSON object, not {type(payload).__name__}"
        )
    try:
        checkpoint.dumps(
            payload,
            what="input",
            limit=limits.max_payload_bytes,
            setting="LEASEFLOW_MAX_PAYLOAD_BYTES",
        )
    except errors.UnstorableValue as exc:
        raise errors.InvalidInput(wf.name, str(exc)) from exc
    try:
        data = wf.context.model_validate(payload)
    except pydantic.ValidationError as exc:
        raise errors.InvalidInput(wf.name, str(exc)) from exc
    try:
        blob = checkpoint.encode(
            data.model_dump(mode="json"),
            limit=limits.checkpoint_limit,
            compress_min=limits.compress_min_bytes,
            level=limits.compress_level,
            what="context",
            setting="LEASEFLOW_MAX_CHECKPOINT_BYTES",
        )
    except errors.UnstorableValue as exc:
        raise errors.InvalidInput(wf.name, str(exc)) from exc
    except (TypeError, ValueError, pydantic_core.PydanticSerializationError) as exc:
        raise errors.InvalidInput(wf.name, f"context is not JSON-serialisable: {exc}") from exc
    return blob, payload
