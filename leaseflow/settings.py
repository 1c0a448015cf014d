"""Configuration from ``LEASEFLOW_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from leaseflow import durations

#: The schemes a PostgreSQL URL may come with, and the two forms leaseflow uses.
_POSTGRES_SCHEMES = ("postgresql+psycopg://", "postgres+psycopg://", "postgresql://", "postgres://")
SQLALCHEMY_SCHEME = "postgresql+psycopg://"
LIBPQ_SCHEME = "postgresql://"


def _with_scheme(url: str, scheme: str) -> str:
    for prefix in _POSTGRES_SCHEMES:
        if url.startswith(prefix):
            return scheme + url[len(prefix) :]
    return url


def sqlalchemy_url(url: str) -> str:
    """A PostgreSQL URL in the form SQLAlchemy and Alembic want (psycopg 3, explicit)."""
    return _with_scheme(url, SQLALCHEMY_SCHEME)


def libpq_url(url: str) -> str:
    """A PostgreSQL URL in the form libpq (psycopg) wants."""
    return _with_scheme(url, LIBPQ_SCHEME)


class Settings(BaseSettings):
    """Every knob of leaseflow; durations are seconds and accept fractions."""

    model_config = SettingsConfigDict(env_prefix="LEASEFLOW_", extra="ignore")

    #: ``None``: the embedded PostgreSQL under ``home`` (see ``leaseflow.local``).
    database_url: str | None = None
    #: ``None``: the embedded Redis under ``home`` (see ``leaseflow.local.redis``).
    broker_url: str | None = None
    #: Where the zero-config database and broker live (relative to the working directory).
    home: Path = Path(".leaseflow")
    result_backend: str | None = None
    workflows: Annotated[list[str], NoDecode] = Field(default_factory=list)
    default_queue: str = "leaseflow"
    #: The queue of the beat jobs; every leaseflow worker consumes it besides its -Q
    #: queues, so a backlog of states never starves the reaper. Default
    #: ``<default_queue>.beat``.
    beat_queue: str | None = None

    lease_ttl: float = Field(60.0, gt=0)
    heartbeat_interval: float = Field(15.0, gt=0)
    reaper_interval: float = Field(5.0, gt=0)
    dispatch_interval: float = Field(10.0, gt=0)
    #: How often beat ends waits and timers that are due, and runs past their deadline.
    timeout_interval: float = Field(1.0, gt=0)
    #: How often beat frees resource locks whose lease expired (audited).
    lock_sweep_interval: float = Field(5.0, gt=0)
    #: A worker process silent this long is dead: beat hands its leases on at once
    #: (default: 2.5 heartbeat intervals, well before its leases would expire).
    worker_dead_after: float | None = Field(None, gt=0)
    #: On a warm shutdown (SIGTERM) a worker lets its running states finish for this
    #: long, then hands the rest back (pending at once, attempt refunded) and exits.
    shutdown_grace: float = Field(20.0, ge=0)
    dispatch_timeout: float = Field(60.0, gt=0)
    dispatch_batch: int = Field(1000, gt=0)
    #: A context's JSON (its checkpoint before compression) may be this large.
    max_checkpoint_bytes: int = Field(1024 * 1024, gt=0)
    #: Run inputs, outputs, Map items, branch results and signal payloads (their JSON).
    max_payload_bytes: int = Field(1024 * 1024, gt=0)
    #: One artefact (``ctx.artifacts.put``), before compression.
    max_artifact_bytes: int = Field(64 * 1024 * 1024, gt=0)
    compress_min_bytes: int = Field(256, ge=0)
    #: zstd's level for checkpoints and artefacts (1 fastest .. 19 smallest).
    compress_level: int = Field(5, ge=1, le=19)
    statement_timeout_ms: int = Field(30_000, ge=0)
    pool_max_size: int = Field(4, gt=0)
    #: Claims commit with ``synchronous_commit=off`` (on their own connections): no
    #: WAL flush wait per claim. A server crash can only undo a claim, never a commit.
    async_claims: bool = True
    #: Inline continuation budget of one task: at most this many states after the
    #: first, and no new state once this many seconds have passed since it started.
    inline_max_states: int = Field(100, ge=0)
    inline_max_seconds: float = Field(2.0, ge=0)
    #: Beat purges finished runs older than this (a duration: ``30d``, ``12h``, seconds);
    #: unset or empty: never.
    retention: float | None = Field(None, gt=0)
    #: How often beat's retention job runs (when ``retention`` is set).
    retention_interval: float = Field(300.0, gt=0)
    #: ``console``: key=value text (``action=... run_id=...``); ``json``: one object a line.
    log_format: Literal["console", "json"] = "console"
    #: The ``leaseflow`` logger's level by name (DEBUG, INFO, ...); unset: the process's.
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] | None = None

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _log_names(cls, value: object, info: ValidationInfo) -> object:
        if isinstance(value, str):
            name = value.strip()
            if info.field_name == "log_format":
                return name.lower()
            return {"WARN": "WARNING"}.get(name.upper(), name.upper()) or None
        return value

    #: A worker serves Prometheus ``/metrics`` (its pool children summed) on this port.
    metrics_port: int | None = Field(None, ge=1, le=65535)
    #: The address of that port (``0.0.0.0`` in a container scraped from outside).
    metrics_host: str = "127.0.0.1"

    @field_validator("retention", mode="before")
    @classmethod
    def _duration(cls, value: object) -> object:
        if isinstance(value, str):
            return durations.parse(value) if value.strip() else None
        return value

    @field_validator("workflows", mode="before")
    @classmethod
    def _split_modules(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("database_url")
    @classmethod
    def _explicit_driver(cls, value: str | None) -> str | None:
        """Accept ``postgres://`` and ``postgresql://``; store the psycopg 3 form."""
        return None if value is None else sqlalchemy_url(value)

    @model_validator(mode="after")
    def _lease_timings_agree(self) -> Settings:
        """A lease must survive a missed heartbeat, and be reaped soon after it expires."""
        from leaseflow import errors

        problems = []
        if self.heartbeat_interval >= self.lease_ttl / 2:
            problems.append(
                f"LEASEFLOW_HEARTBEAT_INTERVAL ({self.heartbeat_interval:g} s) must be less "
                f"than half of LEASEFLOW_LEASE_TTL ({self.lease_ttl:g} s), so that a lease "
                "outlives one missed heartbeat"
            )
        if self.reaper_interval >= self.lease_ttl:
            problems.append(
                f"LEASEFLOW_REAPER_INTERVAL ({self.reaper_interval:g} s) must be less than "
                f"LEASEFLOW_LEASE_TTL ({self.lease_ttl:g} s), so that an expired lease is "
                "reaped within about one lease time"
            )
        if self.dead_after <= 2 * self.heartbeat_interval:
            problems.append(
                f"LEASEFLOW_WORKER_DEAD_AFTER ({self.dead_after:g} s) must be more than twice "
                f"LEASEFLOW_HEARTBEAT_INTERVAL ({self.heartbeat_interval:g} s), so that one "
                "late heartbeat does not make a live worker dead"
            )
        if problems:
            raise errors.ConfigurationError("; ".join(problems))
        return self

    @property
    def dead_after(self) -> float:
        """Seconds without a heartbeat after which a worker process is dead."""
        if self.worker_dead_after is not None:
            return self.worker_dead_after
        return 2.5 * self.heartbeat_interval

    @property
    def maintenance_queue(self) -> str:
        return self.beat_queue or f"{self.default_queue}.beat"

    @property
    def libpq_url(self) -> str:
        """The database URL as libpq (psycopg) wants it."""
        return libpq_url(self.require_database_url())

    def require_database_url(self) -> str:
        from leaseflow import errors

        if not self.database_url:
            raise errors.ConfigurationError(
                "LEASEFLOW_DATABASE_URL is not set: point it at a PostgreSQL database, "
                "e.g. postgresql+psycopg://user@localhost:5432/leaseflow (without it, "
                "workers, clients and the CLI use an embedded PostgreSQL under LEASEFLOW_HOME)"
            )
        return self.database_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests that change the environment)."""
    get_settings.cache_clear()
