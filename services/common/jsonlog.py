"""Structured logs: one JSON object per line, with the active span's trace and span id.

Every line has the same keys (``time``, ``level``, ``logger``, ``message``, ``service``,
``region``, ``instance``, ``trace_id``, ``span_id``), so a log pipeline needs no parsing
rules, and ``trace_id`` leads from a line straight to its trace in the tracing UI. The
ids are empty strings only when no span is active (start-up, shutdown, background
threads). Fields passed with ``extra=`` become keys of their own; an exception becomes
``exception`` (its formatted traceback).

The standard library is enough for this; no formatter package is needed.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

from opentelemetry import trace

# Attributes every LogRecord has: anything else on a record came from ``extra=``.
_RECORD_FIELDS = frozenset(
    vars(logging.LogRecord("", logging.INFO, "", 0, "", None, None)).keys()
) | {"message", "asctime", "taskName"}


def trace_ids() -> tuple[str, str]:
    """(trace_id, span_id) of the active span as lower-case hex, or ("", "")."""
    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return "", ""
    return format(context.trace_id, "032x"), format(context.span_id, "016x")


class JsonFormatter(logging.Formatter):
    """Formats a record as one line of JSON (see the module docstring for its keys)."""

    def __init__(self, service: str, region: str, instance: str) -> None:
        super().__init__()
        self._static = {"service": service, "region": region, "instance": instance}

    def format(self, record: logging.LogRecord) -> str:
        trace_id, span_id = trace_ids()
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            **self._static,
            "trace_id": trace_id,
            "span_id": span_id,
        }
        for key, value in vars(record).items():
            if key not in _RECORD_FIELDS and key not in line:
                line[key] = value
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        elif record.exc_text:
            line["exception"] = record.exc_text
        if record.stack_info:
            line["stack"] = self.formatStack(record.stack_info)
        # default=str: an extra that is not JSON (a UUID, an exception) is still logged.
        return json.dumps(line, default=str, ensure_ascii=False)


def configure(
    *,
    service: str,
    region: str,
    instance: str,
    level: str | int = "INFO",
    stream: TextIO | None = None,
) -> logging.Handler:
    """Send every log record of this process, as JSON lines, to ``stream`` (stderr)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter(service, region, instance))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    return handler
