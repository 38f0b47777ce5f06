"""Log lines that carry the structured fields the code passes (`extra={"trip_id": ...}`).

The standard formatters print only the message, so `extra=` fields (trip id, job id, stage,
timings) never reached a log line. Here they are appended as `key=value` (the default,
AFTERTRIP_LOG_FORMAT=text) or the whole record is one JSON object per line
(AFTERTRIP_LOG_FORMAT=json, for log collectors). `configure_cli_logging` sets up the
`aftertrip-faces` command; `install_celery_logging` hooks Celery's logger set-up signals so the
worker's own and its tasks' log lines get the same treatment.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any, Literal

LogFormat = Literal["text", "json"]

# Attributes every LogRecord has (and those formatters add): everything else came in `extra=`.
_STANDARD = frozenset(
    {
        *logging.LogRecord("", 0, "", 0, "", (), None).__dict__,
        "message",
        "asctime",
        "taskName",
        # Celery's formatters add these to every record (the task's, not the caller's)
        "task_id",
        "task_name",
        "data",
    }
)
CLI_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def extra_fields(record: logging.LogRecord) -> dict[str, Any]:
    """The fields passed with `extra=` to this log call."""
    return {
        k: v for k, v in record.__dict__.items() if k not in _STANDARD and not k.startswith("_")
    }


def _text_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    if text == "" or any(c.isspace() or c in '"=' for c in text):
        return json.dumps(text)  # quoted, so that a reader can split the line on spaces
    return text


def _json_value(value: Any) -> Any:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return str(value)
    return value


class KeyValueFormatter(logging.Formatter):
    """Another formatter's line followed by the record's `extra=` fields as key=value."""

    def __init__(self, inner: logging.Formatter | None = None, fmt: str = CLI_FORMAT) -> None:
        super().__init__(fmt)
        self.inner = inner

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record) if self.inner is not None else super().format(record)
        fields = extra_fields(record)
        if not fields:
            return line
        pairs = " ".join(f"{key}={_text_value(value)}" for key, value in fields.items())
        # after the first line, so that a traceback stays below its message
        first, newline, rest = line.partition("\n")
        return f"{first} {pairs}{newline}{rest}"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message, the task, the extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        task = _current_task()
        if task is not None:
            entry["celery_task_id"] = task.request.id
            entry["celery_task_name"] = task.name
        for key, value in extra_fields(record).items():
            entry.setdefault(key, _json_value(value))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, ensure_ascii=False)


def _current_task() -> Any:
    try:
        from celery import current_task
    except ImportError:  # the CLI's embedded commands do not need Celery
        return None
    task = current_task
    return task if task and getattr(task.request, "id", None) else None


def formatter(log_format: LogFormat, inner: logging.Formatter | None = None) -> logging.Formatter:
    """The formatter for AFTERTRIP_LOG_FORMAT, wrapping `inner` (Celery's) in text mode."""
    if log_format == "json":
        return JsonFormatter()
    return KeyValueFormatter(inner)


def configure_cli_logging(level: int, log_format: LogFormat) -> None:
    """The `aftertrip-faces` command's logging: to stderr, with the structured fields."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)


def reformat_handlers(logger: logging.Logger, log_format: LogFormat) -> None:
    """Give every handler of `logger` the structured formatter (keeping Celery's format)."""
    for handler in logger.handlers:
        current = handler.formatter
        if isinstance(current, KeyValueFormatter | JsonFormatter):
            continue
        handler.setFormatter(formatter(log_format, current))


def install_celery_logging(log_format: LogFormat) -> None:
    """Hook Celery's logger set-up so the worker's and its tasks' lines carry the fields."""
    from celery.signals import after_setup_logger, after_setup_task_logger

    def on_setup(logger: logging.Logger, **_: Any) -> None:
        reformat_handlers(logger, log_format)

    # weak=False: the receivers are closures that nothing else keeps alive
    after_setup_logger.connect(on_setup, weak=False)
    after_setup_task_logger.connect(on_setup, weak=False)
