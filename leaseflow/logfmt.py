"""How the ``leaseflow`` logger writes: ``LEASEFLOW_LOG_FORMAT`` and ``LEASEFLOW_LOG_LEVEL``.

``console`` (the default) is the key=value text of :mod:`leaseflow.logs`, written by
whatever handlers the process has (Celery's in a worker or beat); ``json`` is one JSON
object per line on a handler of its own: ``ts``, ``level``, ``logger``, ``action``,
``message`` and every field of the event. Applied by Celery's ``after_setup_logger``
signal in workers and beat, and by ``leaseflow`` commands and ``serve`` at start.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import sys
from datetime import UTC, datetime
from typing import IO, Any

from leaseflow import logs
from leaseflow.settings import Settings

#: The name of the handler this module installs (found again, never installed twice).
HANDLER_NAME = "leaseflow.logfmt"
#: The text a console handler of the CLI writes (Celery's own handler in workers).
CONSOLE_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
#: The attributes every LogRecord has: what is left over came as ``extra``.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, action, message, then the fields."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "action": getattr(record, "action", None),
            "message": record.getMessage(),
        }
        for key, value in _fields(record).items():
            if value is not None and key not in doc:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    given = getattr(record, logs.FIELDS, None)
    if isinstance(given, dict):
        return given
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k != "action"}


def formatter(fmt: str) -> logging.Formatter:
    return JsonFormatter() if fmt == "json" else logging.Formatter(CONSOLE_FORMAT)


def configure(
    settings: Settings,
    *,
    stream: IO[str] | None = None,
    logfile: str | None = None,
    console_handler: bool = False,
) -> None:
    """Apply the format and level to the ``leaseflow`` logger; idempotent.

    ``json``, or ``console_handler`` (a process without handlers of its own: the CLI,
    serve), gives the logger a handler of its own (``logfile``, else ``stream``, else
    the process's real stderr) and stops it propagating, so no line is written twice.
    Otherwise its lines go to the process's handlers, as without this module.
    """
    logger = logs.logger
    for handler in [h for h in logger.handlers if h.get_name() == HANDLER_NAME]:
        logger.removeHandler(handler)
        handler.close()
    if settings.log_level is not None:
        logger.setLevel(settings.log_level)
    if settings.log_format == "json" or console_handler:
        handler = _handler(stream, logfile)
        handler.set_name(HANDLER_NAME)
        handler.setFormatter(formatter(settings.log_format))
        logger.addHandler(handler)
        logger.propagate = False
    else:
        logger.propagate = True


def configure_cli(settings: Settings) -> None:
    """A command's own lines: only when asked for (json, or a level), else untouched."""
    if settings.log_format == "json" or settings.log_level is not None:
        configure(settings, console_handler=True)


def _handler(stream: IO[str] | None, logfile: str | None) -> logging.Handler:
    if logfile:
        return logging.handlers.WatchedFileHandler(logfile, encoding="utf-8")
    # sys.__stderr__: a worker redirects sys.stderr into a logger (Celery does so too).
    return logging.StreamHandler(stream or sys.__stderr__ or sys.stderr)
