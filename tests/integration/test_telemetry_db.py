"""Database spans against the real PostgreSQL: one per statement and per COMMIT, children
of the caller's span, named by a summary, never carrying the parameters."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy.engine import Engine

from services.common import telemetry
from services.common.db import make_engine, run_transaction


@pytest.fixture
def traced(database_url: str) -> Iterator[tuple[Engine, TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    engine = make_engine(database_url, pool_size=1, application_name="tests-telemetry")
    telemetry.instrument_engine(engine, provider)
    yield engine, provider, exporter
    engine.dispose()
    provider.shutdown()


def test_statements_and_the_commit_are_children_of_the_calls_span(
    traced: tuple[Engine, TracerProvider, InMemorySpanExporter],
) -> None:
    engine, provider, exporter = traced
    secret_id = uuid.uuid4()
    with provider.get_tracer("test").start_as_current_span("CreateTransfer") as parent:
        count = run_transaction(
            engine,
            lambda conn: conn.execute(
                sa.text("SELECT count(*) FROM accounts WHERE account_id = :id"), {"id": secret_id}
            ).scalar_one(),
        )
    assert count == 0
    spans = [s for s in exporter.get_finished_spans() if s.name != "CreateTransfer"]
    names = [s.name for s in spans]
    assert "SELECT accounts" in names
    assert names[-1] == "COMMIT"
    for span in spans:
        assert span.kind is trace.SpanKind.CLIENT
        assert span.parent is not None
        assert span.parent.span_id == parent.get_span_context().span_id
        attributes = dict(span.attributes or {})
        assert attributes["db.system"] == "postgresql"
        assert attributes["db.namespace"] == engine.url.database
        assert attributes["server.port"] == engine.url.port
        assert str(secret_id) not in str(attributes)  # parameters never recorded
        assert "account_id =" not in str(attributes)  # nor the statement text
    select = next(s for s in spans if s.name == "SELECT accounts")
    assert dict(select.attributes or {})["db.query.summary"] == "SELECT accounts"


def test_a_failed_statement_records_its_sqlstate_only(
    traced: tuple[Engine, TracerProvider, InMemorySpanExporter],
) -> None:
    engine, _, exporter = traced
    with pytest.raises(sa.exc.DataError), engine.connect() as conn:
        conn.execute(sa.text("SELECT 1 / (:zero - :zero)"), {"zero": 7})
    (span,) = [s for s in exporter.get_finished_spans() if s.name == "SELECT"]
    assert span.status.status_code is trace.StatusCode.ERROR
    attributes = dict(span.attributes or {})
    assert attributes["db.response.status_code"] == "22012"  # division_by_zero
    assert attributes["error.type"] == "DivisionByZero"
    assert "division" not in (span.status.description or "")


def test_statements_of_a_call_that_is_not_sampled_make_no_span(
    traced: tuple[Engine, TracerProvider, InMemorySpanExporter],
) -> None:
    """A call that came in with an unsampled traceparent: nothing of it is recorded."""
    engine, _, exporter = traced
    unsampled = trace.NonRecordingSpan(
        trace.SpanContext(
            trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
            span_id=0x00F067AA0BA902B7,
            is_remote=True,
            trace_flags=trace.TraceFlags(0),
        )
    )
    with trace.use_span(unsampled):
        run_transaction(engine, lambda conn: conn.execute(sa.text("SELECT 1")).scalar_one())
    assert exporter.get_finished_spans() == ()
    # Outside any call (migrations, seeding) statements are still traced.
    run_transaction(engine, lambda conn: conn.execute(sa.text("SELECT 1")).scalar_one())
    assert [s.name for s in exporter.get_finished_spans()] == ["SELECT", "COMMIT"]
