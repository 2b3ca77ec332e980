"""Tracing: OTEL_* configuration, the resource, statement summaries, and the gRPC
interceptors on a real server over a loopback socket (spans kept by the SDK's in-memory
exporter; the e2e test reads them back from the tracing UI instead)."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider, sampling
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from meshbank.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from services.common import errors, telemetry
from services.common.config import ConfigError
from services.common.grpc_errors import translate_errors

TOKEN = "secret-bearer-token-" + uuid.uuid4().hex
TRANSFER_ID = str(uuid.uuid4())


# -- configuration ---------------------------------------------------------------------


def test_no_endpoint_means_spans_but_no_export() -> None:
    config = telemetry.load_config({})
    assert config.enabled
    assert not config.exporting
    provider = telemetry.build_provider({}, service="meshbank-transfer")
    assert provider is not None  # spans exist, so logs carry trace ids


def test_the_traces_endpoint_wins_over_the_general_one() -> None:
    env = {
        "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4317",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://collector.internal:4317",
    }
    assert telemetry.load_config(env).endpoint == "https://collector.internal:4317"


@pytest.mark.parametrize(
    ("env", "exporting", "enabled"),
    [
        ({"OTEL_SDK_DISABLED": "true"}, False, False),
        ({"OTEL_SDK_DISABLED": "TRUE", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:1"}, False, False),
        ({"OTEL_SDK_DISABLED": "false", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:1"}, True, True),
        (
            {"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:1"},
            False,
            True,
        ),
    ],
)
def test_disabling(env: dict[str, str], exporting: bool, enabled: bool) -> None:
    config = telemetry.load_config(env)
    assert (config.enabled, config.exporting) == (enabled, exporting)
    if not enabled:
        assert telemetry.build_provider(env, service="s") is None


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4317"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://host"}, "must be http(s)://host:port"),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "ftp://h:1"}, "OTEL_EXPORTER_OTLP_TRACES"),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:port"}, "OTEL_EXPORTER_OTLP_ENDPOINT"),
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_SDK_DISABLED": "yes"}, "OTEL_SDK_DISABLED"),
        ({"OTEL_TRACES_SAMPLER": "jaeger_remote"}, "OTEL_TRACES_SAMPLER="),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "10%"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "10"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
    ],
)
def test_bad_configuration_names_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ConfigError, match="invalid tracing configuration") as caught:
        telemetry.load_config(env)
    assert named in str(caught.value)


def test_the_sampler_comes_from_the_environment() -> None:
    def sampled(provider: TracerProvider | None, trace_id: int) -> bool:
        assert provider is not None
        result = provider.sampler.should_sample(None, trace_id, "CreateTransfer")
        return result.decision is sampling.Decision.RECORD_AND_SAMPLE

    low, high = 1, 2**64 - 1  # the ratio samplers compare the id's low 64 bits
    env = {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    ratio = telemetry.build_provider(env, service="s")
    assert isinstance(ratio.sampler if ratio else None, sampling.ParentBasedTraceIdRatio)
    assert (sampled(ratio, low), sampled(ratio, high)) == (True, False)
    default = telemetry.build_provider({}, service="s")  # the spec's parentbased_always_on
    assert (sampled(default, low), sampled(default, high)) == (True, True)


def test_every_problem_is_reported_at_once() -> None:
    with pytest.raises(ConfigError) as caught:
        telemetry.load_config({"OTEL_SDK_DISABLED": "maybe", "OTEL_TRACES_EXPORTER": "jaeger"})
    assert "OTEL_SDK_DISABLED" in str(caught.value)
    assert "OTEL_TRACES_EXPORTER" in str(caught.value)


def test_resource_comes_from_the_service_and_the_environment_overrides_it() -> None:
    res = telemetry.resource(
        {}, service="meshbank-transfer", region="us-east", zone="us-east-1a", instance_id="i-1"
    )
    assert res.attributes["service.name"] == "meshbank-transfer"
    assert res.attributes["cloud.region"] == "us-east"
    assert res.attributes["cloud.availability_zone"] == "us-east-1a"
    assert res.attributes["service.instance.id"] == "i-1"
    assert res.attributes["telemetry.sdk.name"] == "opentelemetry"
    env = {
        "OTEL_RESOURCE_ATTRIBUTES": "cloud.region=eu%2Dwest,deployment.environment=prod",
        "OTEL_SERVICE_NAME": "ledger",
    }
    res = telemetry.resource(
        env, service="meshbank-transfer", region="us-east", zone="", instance_id=""
    )
    assert res.attributes["service.name"] == "ledger"
    assert res.attributes["cloud.region"] == "eu-west"
    assert res.attributes["deployment.environment"] == "prod"


# -- statement summaries ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("statement", "summary"),
    [
        (
            "SELECT accounts.account_id, accounts.balance_minor \nFROM accounts \n"
            "WHERE accounts.account_id = %(account_id_1)s::UUID FOR UPDATE",
            ("SELECT", "SELECT accounts"),
        ),
        (
            "INSERT INTO ledger_entries (entry_id, amount_minor) VALUES (%(a)s, %(b)s)",
            ("INSERT", "INSERT ledger_entries"),
        ),
        ('UPDATE "accounts" SET balance_minor=%(b)s', ("UPDATE", "UPDATE accounts")),
        ("DELETE FROM idempotency_keys WHERE x = 1", ("DELETE", "DELETE idempotency_keys")),
        ("/* app */ -- note\n select 1", ("SELECT", "SELECT")),
        (
            "WITH moved AS (SELECT * FROM ledger_entries) SELECT sum(x) FROM moved",
            ("SELECT", "SELECT moved"),
        ),
        ("SET TRANSACTION ISOLATION LEVEL SERIALIZABLE", ("SET", "SET")),
        ("", ("", "")),
    ],
)
def test_statement_summary(statement: str, summary: tuple[str, str]) -> None:
    assert telemetry.summarize(statement) == summary


def test_a_summary_never_carries_a_literal() -> None:
    statement = "SELECT * FROM users WHERE password_hash = 'argon2-secret' AND id = 42"
    _operation, summary = telemetry.summarize(statement)
    assert summary == "SELECT users"
    assert "secret" not in summary
    assert "42" not in summary


# -- the interceptors on a real server -------------------------------------------------


class TransferService(transfer_pb2_grpc.TransferServiceServicer):
    """CreateTransfer succeeds, except request_id "overdrawn", refused the real way
    (a DomainError translated to a rich status by translate_errors)."""

    @translate_errors
    def CreateTransfer(
        self, request: transfer_pb2.CreateTransferRequest, context: grpc.ServicerContext
    ) -> transfer_pb2.CreateTransferResponse:
        assert dict(context.invocation_metadata())["authorization"] == f"Bearer {TOKEN}"
        logging.getLogger("tests.transfer").info("moving money")
        if request.request_id == "overdrawn":
            raise errors.FailedPrecondition("insufficient funds", reason="INSUFFICIENT_FUNDS")
        return transfer_pb2.CreateTransferResponse(
            transfer=transfer_pb2.Transfer(transfer_id=TRANSFER_ID, request_id=request.request_id)
        )

    def GetTransfer(
        self, _request: transfer_pb2.GetTransferRequest, context: grpc.ServicerContext
    ) -> transfer_pb2.GetTransferResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")

    def ListTransfers(
        self, _request: transfer_pb2.ListTransfersRequest, context: grpc.ServicerContext
    ) -> transfer_pb2.ListTransfersResponse:
        context.abort(grpc.StatusCode.UNIMPLEMENTED, "not in this test")


@pytest.fixture
def spans() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider(
        resource=telemetry.resource(
            {}, service="meshbank-transfer", region="us-east", zone="us-east-1a", instance_id="t-1"
        )
    )
    provider.add_span_processor(telemetry.IdentityOnSpans(provider.resource))
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def address(spans: tuple[TracerProvider, InMemorySpanExporter]) -> Iterator[str]:
    provider, _ = spans
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=telemetry.server_interceptors(provider),
        options=[("grpc.so_reuseport", 0)],
    )
    transfer_pb2_grpc.add_TransferServiceServicer_to_server(TransferService(), server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        server.stop(0).wait()


def _call(address: str, provider: TracerProvider, request_id: str) -> Any:
    with grpc.insecure_channel(address) as raw:
        channel = telemetry.traced_channel(raw, provider)
        stub = transfer_pb2_grpc.TransferServiceStub(channel)
        return stub.CreateTransfer(
            transfer_pb2.CreateTransferRequest(request_id=request_id, amount_minor=5),
            metadata=(("authorization", f"Bearer {TOKEN}"),),
            timeout=10,
        )


def _by_kind(finished: tuple[ReadableSpan, ...], kind: trace.SpanKind) -> ReadableSpan:
    (span,) = [s for s in finished if s.kind is kind]
    return span


def test_a_call_is_one_trace_from_client_to_server_with_its_ids(
    spans: tuple[TracerProvider, InMemorySpanExporter], address: str
) -> None:
    provider, exporter = spans
    reply = _call(address, provider, "req-42")
    assert reply.transfer.transfer_id == TRANSFER_ID
    finished = exporter.get_finished_spans()
    client = _by_kind(finished, trace.SpanKind.CLIENT)
    server = _by_kind(finished, trace.SpanKind.SERVER)
    assert client.context is not None
    assert server.context is not None
    assert server.context.trace_id == client.context.trace_id  # traceparent crossed
    assert server.parent is not None
    assert server.parent.span_id == client.context.span_id
    assert server.name == "/meshbank.transfer.v1.TransferService/CreateTransfer"
    attributes = dict(server.attributes or {})
    assert attributes[telemetry.REQUEST_ID] == "req-42"
    assert attributes[telemetry.TRANSFER_ID] == TRANSFER_ID
    assert attributes["meshbank.region"] == "us-east"
    assert attributes["meshbank.instance"] == "t-1"
    assert attributes["rpc.grpc.status_code"] == 0


def test_no_span_records_the_bearer_token(
    spans: tuple[TracerProvider, InMemorySpanExporter], address: str
) -> None:
    provider, exporter = spans
    _call(address, provider, "req-token")
    with pytest.raises(grpc.RpcError):
        _call(address, provider, "overdrawn")
    finished = exporter.get_finished_spans()
    assert len(finished) == 4
    for span in finished:
        for value in (span.attributes or {}).values():
            assert TOKEN not in str(value)
        for ev in span.events:
            assert TOKEN not in str(ev.attributes)


def test_a_refused_call_records_its_code_and_logs_its_request_id(
    spans: tuple[TracerProvider, InMemorySpanExporter],
    address: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    provider, exporter = spans
    with (
        caplog.at_level(logging.INFO, logger="services.common.telemetry"),
        pytest.raises(grpc.RpcError) as caught,
    ):
        _call(address, provider, "overdrawn")
    assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    server = _by_kind(exporter.get_finished_spans(), trace.SpanKind.SERVER)
    attributes = dict(server.attributes or {})
    code = grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert attributes["rpc.grpc.status_code"] == code
    assert attributes[telemetry.REQUEST_ID] == "overdrawn"
    # A client's mistake is not the server's error (semantic conventions).
    assert server.status.status_code is not trace.StatusCode.ERROR
    (record,) = [r for r in caplog.records if r.name == "services.common.telemetry"]
    assert record.__dict__["request_id"] == "overdrawn"
    assert record.__dict__["grpc_code"] == "FAILED_PRECONDITION"


def test_health_checks_are_not_traced(
    spans: tuple[TracerProvider, InMemorySpanExporter], address: str
) -> None:
    provider, exporter = spans
    with grpc.insecure_channel(address) as raw:
        channel = telemetry.traced_channel(raw, provider)
        reply = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), timeout=5
        )
    assert reply.status == health_pb2.HealthCheckResponse.SERVING
    assert exporter.get_finished_spans() == ()


def _call_under_traceparent(address: str, request_id: str, *, sampled: bool) -> tuple[str, str]:
    """A call as Envoy makes it: a W3C traceparent, no client span of ours.
    Returns the (trace id, parent span id) it carried."""
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    with grpc.insecure_channel(address) as channel:
        transfer_pb2_grpc.TransferServiceStub(channel).CreateTransfer(
            transfer_pb2.CreateTransferRequest(request_id=request_id),
            metadata=(
                ("authorization", f"Bearer {TOKEN}"),
                ("traceparent", f"00-{trace_id}-{parent}-{'01' if sampled else '00'}"),
            ),
            timeout=10,
        )
    return trace_id, parent


def test_the_server_joins_a_trace_that_came_in_on_traceparent(
    spans: tuple[TracerProvider, InMemorySpanExporter], address: str
) -> None:
    """What Envoy sends: a W3C traceparent header, no client span of ours."""
    _, exporter = spans
    trace_id, parent = _call_under_traceparent(address, "from-envoy", sampled=True)
    server = _by_kind(exporter.get_finished_spans(), trace.SpanKind.SERVER)
    assert server.context is not None
    assert server.parent is not None
    assert format(server.context.trace_id, "032x") == trace_id
    assert format(server.parent.span_id, "016x") == parent


def test_the_server_follows_an_unsampled_traceparent(
    spans: tuple[TracerProvider, InMemorySpanExporter], address: str
) -> None:
    """The first proxy decided not to sample: the service records nothing of the call."""
    _, exporter = spans
    _call_under_traceparent(address, "unsampled", sampled=False)
    assert exporter.get_finished_spans() == ()
