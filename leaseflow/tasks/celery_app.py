"""The Celery app: configured from ``LEASEFLOW_*`` settings, one task per state."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

from celery import Celery, Task, bootsteps, signals

from leaseflow import embedded, errors, faults, logs
from leaseflow.beat import jobs
from leaseflow.fsm import registry
from leaseflow.fsm.definition import StateSpec, Workflow
from leaseflow.settings import Settings, get_settings
from leaseflow.tasks import dispatch, runtime

REAP_TASK = "leaseflow.beat.reap"
DISPATCH_TASK = "leaseflow.beat.dispatch"
PROBE_TASK = dispatch.PROBE_TASK
#: Extra seconds between a state's soft time limit and the hard kill of its process.
HARD_LIMIT_GRACE = 10.0

_listeners: dict[int, registry.StateListener] = {}


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
    JSON only, late acks, requeue on a lost worker, prefetch 1."""
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
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "enable_utc": True,
    }


def make_app(settings: Settings | None = None) -> Celery:
    """The Celery app of ``settings``; no I/O, so it is cheap to build at import.

    Without ``LEASEFLOW_BROKER_URL`` it uses the filesystem broker under
    ``LEASEFLOW_HOME``; the embedded database is started only when a worker starts
    (``worker_init``), a task first needs the store, or a client is made.
    """
    settings = settings or get_settings()
    broker_url = embedded.broker_url(settings)
    app = Celery("leaseflow", set_as_current=False)
    app.conf.update(
        broker_url=broker_url,
        **embedded.broker_options(broker_url),
        **celery_settings(settings.default_queue, settings.result_backend),
        beat_schedule={
            "leaseflow-reaper": {
                "task": REAP_TASK,
                "schedule": timedelta(seconds=settings.reaper_interval),
                "options": {
                    "expires": max(1.0, settings.reaper_interval * 2),
                    "queue": settings.maintenance_queue,
                },
            },
            "leaseflow-dispatcher": {
                "task": DISPATCH_TASK,
                "schedule": timedelta(seconds=settings.dispatch_interval),
                "options": {
                    "expires": max(1.0, settings.dispatch_interval * 2),
                    "queue": settings.maintenance_queue,
                },
            },
        },
        leaseflow_maintenance_queue=settings.maintenance_queue,
    )
    _register_beat_tasks(app)
    app.steps["consumer"].add(ReuseRedisClients)

    def listener(wf: Workflow, spec: StateSpec) -> None:
        _register_state_task(app, wf, spec)

    _listeners[id(app)] = listener
    registry.subscribe(listener)
    import_workflows(settings.workflows)
    return app


def dispose_app(app: Celery) -> None:
    """Stop registering new states on ``app`` and close its broker connections."""
    listener = _listeners.pop(id(app), None)
    if listener is not None:
        registry.unsubscribe(listener)
    app.close()


def same_broker(app: Celery, settings: Settings) -> bool:
    """Does ``app`` publish where ``settings`` says (broker and default queue)?"""
    return (app.conf.broker_url, app.conf.task_default_queue) == (
        embedded.broker_url(settings),
        settings.default_queue,
    )


class ReuseRedisClients(bootsteps.StartStopStep):
    """In the worker's main process, the Redis channels that ack messages and publish
    task events reuse one ``redis.Redis`` client (``dispatch.reuse_redis_client``).

    kombu builds a client per ack and per event (four per task), about a tenth of the
    main process's CPU per task here. Started after the task consumer, so again after
    every reconnection, on the new channels.
    """

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        dispatcher = getattr(c, "event_dispatcher", None)
        for channel in (
            getattr(getattr(c, "task_consumer", None), "channel", None),
            getattr(getattr(dispatcher, "producer", None), "channel", None),
        ):
            if channel is not None:
                dispatch.reuse_redis_client(channel)


def _register_state_task(app: Celery, wf: Workflow, spec: StateSpec) -> None:
    name = wf.task_name(spec.name)
    if name in app.tasks:
        return  # another version declared the same state: one task serves them all
    options: dict[str, Any] = {"name": name, "bind": True, "ignore_result": True, "shared": False}
    if spec.timeout is not None:
        options["soft_time_limit"] = spec.timeout
        options["time_limit"] = spec.timeout + HARD_LIMIT_GRACE
    # No task-level ``queue`` (deprecated in Celery 5.7): tasks/dispatch.py, the only
    # publisher, routes every message to its state's queue explicitly.

    def run_state(task: Task, run_id: str, step_seq: int) -> str:
        engine = runtime.get()
        result = engine.runner.run_step(str(run_id), int(step_seq))
        if result.fork is not None:
            dispatch.publish_fork(task.app, result.fork)
        dispatch.publish_all(task.app, result.dispatch)
        return result.result

    def run_branch(task: Task, group_id: int, idx: int) -> str:
        engine = runtime.get()
        result = engine.runner.run_branch(int(group_id), int(idx))
        # In a chord, the chord body wakes the join; "chord_callback_lost" simulates a
        # body that never comes (a failed result backend), leaving it to beat's repair.
        in_chord = bool(task.request.chord) or faults.armed("chord_callback_lost")
        dispatch.publish_all(task.app, result.dispatch, in_chord=in_chord)
        return result.result

    body: Callable[..., str] = run_branch if spec.branch else run_state

    body.__name__ = body.__qualname__ = f"{wf.name}__{spec.name}"
    body.__doc__ = f"{'Branch' if spec.branch else 'State'} {spec.name!r} of {wf.name!r}."
    app.task(**options)(body)


def _register_beat_tasks(app: Celery) -> None:
    @app.task(name=REAP_TASK, ignore_result=True, shared=False)
    def reap() -> int:
        engine = runtime.get()
        found = jobs.reap(engine.store, limit=engine.settings.dispatch_batch)
        dispatch.publish_all(app, found)
        return len(found)

    @app.task(name=DISPATCH_TASK, ignore_result=True, shared=False)
    def redispatch() -> int:
        return _redispatch(probe=True)

    @app.task(name=PROBE_TASK, ignore_result=True, shared=False)
    def queue_probe(queue: str, sent_at: str) -> int:
        """Came through ``queue``: everything published there before ``sent_at`` has
        been delivered, so what is still pending from before it is lost; re-publish it
        now (see ``jobs.dispatch_overdue``)."""
        runtime.get().store.probe_passed(queue, datetime.fromisoformat(sent_at))
        return _redispatch(probe=False)

    def _redispatch(*, probe: bool) -> int:
        engine = runtime.get()
        default = app.conf.task_default_queue
        found = jobs.dispatch_overdue(
            engine.store,
            lambda workflow, state: dispatch.queue_for(workflow, state, default),
            limit=engine.settings.dispatch_batch,
            probe=probe,
        )
        dispatch.publish_all(app, found.dispatches)
        for sent in found.probes:
            dispatch.publish_probe(app, sent.queue, sent.sent_at)
        return len(found.dispatches)


def prepare_worker() -> None:
    """At worker start: every workflow is valid and its transitions are registered."""
    workflows = registry.all_workflows()
    for wf in workflows:
        wf.validate()
    # Before the pool forks: the children inherit the resolved URLs, never start a server.
    settings = embedded.resolve(get_settings())
    store = runtime.make_store(settings, application_name="leaseflow-worker-init")
    try:
        for wf in workflows:
            store.register_workflow(wf)
    finally:
        store.close()
    logs.event(
        "worker_ready",
        20,
        workflows=",".join(f"{wf.name}@v{wf.version}" for wf in workflows) or "none",
    )


@signals.celeryd_after_setup.connect
def _consume_maintenance_queue(sender: Any = None, instance: Any = None, **_: Any) -> None:
    """Every worker also consumes the beat queue, whatever its -Q: the reaper and the
    dispatcher must run even while the state queues hold a backlog."""
    application = getattr(instance, "app", None)
    queue = getattr(getattr(application, "conf", None), "leaseflow_maintenance_queue", None)
    if application is not None and queue:
        application.amqp.queues.select_add(queue)


@signals.worker_init.connect
def _on_worker_init(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "app", None) is app:
        prepare_worker()


@signals.beat_init.connect
def _on_beat_init(sender: Any = None, **_: Any) -> None:
    if getattr(sender, "app", None) is app:
        embedded.resolve(get_settings(), database=False)  # says which broker beat uses


app = make_app()
