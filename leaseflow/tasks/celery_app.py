"""The Celery app: configured from ``LEASEFLOW_*`` settings, one task per state, the
beat jobs. Built lazily: ``get_app()`` (and ``leaseflow.tasks.app``, which ``celery -A
leaseflow.tasks`` reads) builds it on first use, so importing leaseflow does no I/O
and imports no workflow module before a worker or a client asks for the app."""

from __future__ import annotations

import importlib
import threading
from collections.abc import Collection
from typing import Any

from celery import Celery, signals

from leaseflow import errors, local, logfmt, logs
from leaseflow.beat import tasks as beat_tasks
from leaseflow.fsm import registry
from leaseflow.fsm.definition import StateSpec, Workflow
from leaseflow.settings import Settings, get_settings
from leaseflow.tasks import lifecycle, runtime, states

_listeners: dict[int, registry.StateListener] = {}
_lock = threading.Lock()
_app: Celery | None = None


def import_workflows(modules: list[str]) -> None:
    """Import the modules named in ``LEASEFLOW_WORKFLOWS`` (they declare workflows)."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            raise errors.ConfigurationError(
                f"cannot import workflow module {name!r} from LEASEFLOW_WORKFLOWS: {exc}"
            ) from exc


def celery_settings(queue: str, result_backend: str | None = None) -> dict[str, Any]:
    """The Celery settings leaseflow runs with (benchmark baselines reuse them):
    JSON only, late acks, requeue on a lost worker, prefetch 1. Task events follow
    Celery's defaults, off: ``worker -E`` turns them on (see ``follow_task_events``)."""
    return {
        "result_backend": result_backend,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "task_ignore_result": True,
        "task_default_queue": queue,
        "broker_connection_retry_on_startup": True,
        "worker_hijack_root_logger": False,
        "enable_utc": True,
    }


def priority_settings(broker_url: str) -> dict[str, Any]:
    """Message priorities (``client.start(priority=0..9)``): on Redis, kombu's own four
    priority steps (a list per step, the lowest number served first;
    ``dispatch.broker_priority`` maps, so leaseflow's 7-9, 4-6, 1-3 and 0 are served in
    that order; ten steps would make every consumer's BRPOP watch ten lists per queue);
    on RabbitMQ, queues declared with ``x-max-priority`` (a queue declared before
    without it must be deleted once: RabbitMQ refuses to change its arguments)."""
    if broker_url.startswith(("amqp", "pyamqp")):
        return {"task_queue_max_priority": 9, "task_default_priority": 0}
    return {}


def make_app(settings: Settings | None = None) -> Celery:
    """A Celery app for ``settings``: it imports the modules of ``LEASEFLOW_WORKFLOWS``
    and registers a task per state (also for workflows declared later). No I/O.

    Without ``LEASEFLOW_BROKER_URL`` it uses the embedded Redis of ``LEASEFLOW_HOME``
    (its socket's URL is known without I/O); that server, and the embedded database,
    are started only when a worker starts (``worker_init``), beat starts
    (``beat_init``), a task first needs the store, or a client is made.
    """
    settings = settings or get_settings()
    broker_url = local.broker_url(settings)
    app = Celery("leaseflow", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        **celery_settings(settings.default_queue, settings.result_backend),
        **priority_settings(broker_url),
        beat_schedule=beat_tasks.schedule(settings),
        leaseflow_maintenance_queue=settings.maintenance_queue,
    )
    beat_tasks.register(app)
    app.steps["consumer"].add(states.ReuseRedisClients)

    def listener(wf: Workflow, spec: StateSpec) -> None:
        states.register(app, wf, spec)

    _listeners[id(app)] = listener
    registry.subscribe(listener)
    import_workflows(settings.workflows)
    return app


def get_app() -> Celery:
    """The process's app, built from the environment on first use."""
    global _app
    with _lock:
        if _app is None:
            _app = make_app()
        return _app


def dispose_app(app: Celery) -> None:
    """Stop registering new states on ``app`` and close its broker connections."""
    listener = _listeners.pop(id(app), None)
    if listener is not None:
        registry.unsubscribe(listener)
    app.close()


def same_broker(app: Celery, settings: Settings) -> bool:
    """Does ``app`` publish where ``settings`` says (broker and default queue)?"""
    return (app.conf.broker_url, app.conf.task_default_queue) == (
        local.broker_url(settings),
        settings.default_queue,
    )


def startup_problems(settings: Settings, *, need_workflows: bool) -> list[errors.LeaseflowError]:
    """What must keep a worker (or beat) from starting: every invalid definition among
    the workflows of this process, and, when ``need_workflows``, having none at all (a
    worker would drop the messages of every run sent to it as unregistered tasks)."""
    found: list[errors.LeaseflowError] = []
    workflows = registry.all_workflows()
    for wf in workflows:
        try:
            wf.validate()
        except errors.InvalidDefinition as exc:
            found.append(exc)
    if need_workflows and not workflows:
        where = (
            f"the modules of LEASEFLOW_WORKFLOWS ({', '.join(settings.workflows)}) declare none"
            if settings.workflows
            else "LEASEFLOW_WORKFLOWS is not set"
        )
        found.append(
            errors.ConfigurationError(
                f"no workflow to serve: {where}. Set LEASEFLOW_WORKFLOWS to the modules "
                "that declare your workflows; a worker for the beat queue only runs as "
                "`leaseflow worker --maintenance-only`"
            )
        )
    return found


def prepare_worker(queues: Collection[str]) -> None:
    """At worker start (``queues``: those it consumes): every workflow is valid and its
    transitions are registered, and a worker of state queues has workflows to serve.

    Otherwise it logs every problem at ERROR and raises ``SystemExit(1)``: Celery's
    signal dispatch swallows an ``Exception`` from a ``worker_init`` receiver (the
    worker would start anyway), but lets ``SystemExit`` through.
    """
    settings = get_settings()
    states_queues = set(queues) - {settings.maintenance_queue}
    problems = startup_problems(settings, need_workflows=bool(states_queues))
    for problem in problems:
        logs.error("worker_refused", code=problem.code, problem=str(problem))
    if problems:
        raise SystemExit(1)
    workflows = registry.all_workflows()
    # Before the pool forks: the children inherit the resolved URLs, never start a server;
    # a subprocess finds the embedded server's URL and registers as one of its owners.
    settings = local.resolve(settings)
    local.export_env(settings)
    store = runtime.make_store(settings, application_name="leaseflow-worker-init")
    try:
        for wf in workflows:
            store.register_workflow(wf)
    finally:
        store.close()
    names = ",".join(f"{wf.name}@v{wf.version}" for wf in workflows)
    logs.info("worker_ready", workflows=names or "none")


@signals.celeryd_after_setup.connect
def _consume_maintenance_queue(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Every worker also consumes the beat queue, whatever its -Q: the reaper and the
    dispatcher must run even while the state queues hold a backlog."""
    application = getattr(instance, "app", None)
    queue = getattr(getattr(application, "conf", None), "leaseflow_maintenance_queue", None)
    if application is not None and queue:
        application.amqp.queues.select_add(queue)


def follow_task_events(worker: Any) -> None:
    """A worker that sends task events (``-E``, or ``worker_send_task_events``) also
    sends ``task-sent`` for the states it publishes, so a monitor sees each one queued;
    without them it sends neither, as Celery does. Before the pool forks."""
    if worker.task_events:
        worker.app.conf.task_send_sent_event = True


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    application = getattr(sender, "app", None)
    if application is not None and id(application) in _listeners:  # a leaseflow app
        follow_task_events(sender)
    if _app is not None and application is _app:
        logfmt.configure_cli(get_settings())  # Celery sets logging up after this signal
        # The queues -Q selected (all declared ones without -Q); not yet the beat queue.
        prepare_worker(list(sender.app.amqp.queues.consume_from))
        lifecycle.remember(sender)


@signals.after_setup_logger.connect
def _on_setup_logger(logfile: str | None = None, **_: Any) -> None:
    """Workers and beat: LEASEFLOW_LOG_FORMAT and LEASEFLOW_LOG_LEVEL, where Celery logs."""
    logfmt.configure(get_settings(), logfile=logfile or None)


@signals.beat_init.connect
def _on_beat_init(sender: Any = None, **_: Any) -> None:
    if _app is not None and getattr(sender, "app", None) is _app:
        # Says which broker beat uses; exported for what beat starts, like the worker.
        local.export_env(local.resolve(get_settings(), database=False))
