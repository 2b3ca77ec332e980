"""Structured logs: one JSON object per line, with the active span's ids on each line."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from services.common import jsonlog

KEYS = {"time", "level", "logger", "message", "service", "region", "instance"}


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    jsonlog.configure(
        service="transfer", region="us-east", instance="us-east-transfer-1", stream=out
    )
    try:
        yield out
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def lines(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_every_line_is_one_json_object_with_the_same_keys(stream: io.StringIO) -> None:
    log = logging.getLogger("services.ledger")
    log.info("posted %s", "t-1")
    log.warning("a\nmessage over\nthree lines")
    first, second = lines(stream)
    assert KEYS | {"trace_id", "span_id"} <= set(first)
    assert first["message"] == "posted t-1"
    assert first["level"] == "INFO"
    assert first["logger"] == "services.ledger"
    assert (first["service"], first["region"], first["instance"]) == (
        "transfer",
        "us-east",
        "us-east-transfer-1",
    )
    assert first["time"].endswith("+00:00")
    # Outside a span the ids are empty, not missing: every line has the same shape.
    assert (first["trace_id"], first["span_id"]) == ("", "")
    assert second["message"] == "a\nmessage over\nthree lines"


def test_lines_inside_a_span_carry_its_trace_and_span_id(stream: io.StringIO) -> None:
    provider = TracerProvider()
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("CreateTransfer") as span:
        logging.getLogger("x").info("inside")
        context = span.get_span_context()
    logging.getLogger("x").info("after")
    inside, after = lines(stream)
    assert inside["trace_id"] == format(context.trace_id, "032x")
    assert inside["span_id"] == format(context.span_id, "016x")
    assert len(inside["trace_id"]) == 32
    assert len(inside["span_id"]) == 16
    assert after["trace_id"] == ""


def test_extra_fields_and_exceptions(stream: io.StringIO) -> None:
    log = logging.getLogger("x")
    log.info("CreateTransfer failed", extra={"request_id": "r-1", "grpc_code": "ABORTED"})
    log.info("spoofed", extra={"trace_id_x": 1, "service_override": object()})
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("unhandled")
    failed, spoofed, crashed = lines(stream)
    assert (failed["request_id"], failed["grpc_code"]) == ("r-1", "ABORTED")
    assert spoofed["service"] == "transfer"
    assert spoofed["trace_id_x"] == 1
    assert isinstance(spoofed["service_override"], str)  # not JSON: logged as its str()
    assert crashed["level"] == "ERROR"
    assert "ValueError: boom" in crashed["exception"]


def test_an_extra_cannot_replace_an_owned_key(stream: io.StringIO) -> None:
    logging.getLogger("x").info("hello", extra={"service": "evil", "region": "mars"})
    (line,) = lines(stream)
    assert (line["service"], line["region"]) == ("transfer", "us-east")
