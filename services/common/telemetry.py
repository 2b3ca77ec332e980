"""OpenTelemetry tracing for the services: configuration, gRPC interceptors, database spans.

Configured the standard ``OTEL_*`` way, so a production deployment points it at its
collector, Jaeger or Tempo without code changes. ``setup`` reads the environment once at
start-up (nothing here connects at import time) and fails fast, naming the variable, on
a value it cannot honour:

* ``OTEL_SDK_DISABLED=true``: no SDK at all; spans are the API's no-ops.
* ``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` / ``OTEL_EXPORTER_OTLP_ENDPOINT`` (``http://``
  = plaintext, ``https://`` = TLS): where spans go, over OTLP/gRPC (the only exporter
  installed, so ``OTEL_EXPORTER_OTLP_[TRACES_]PROTOCOL`` must be ``grpc`` if set).
  With no endpoint, nothing is exported, but spans still exist in-process, so log lines
  carry the trace id that came in on ``traceparent`` from Envoy.
* ``OTEL_TRACES_EXPORTER``: ``otlp`` (default) or ``none``.
* ``OTEL_SERVICE_NAME``, ``OTEL_RESOURCE_ATTRIBUTES``: override the resource this module
  fills from the service's own configuration (service name, region, zone, instance id).
* ``OTEL_TRACES_SAMPLER`` / ``OTEL_TRACES_SAMPLER_ARG``: one of the spec's samplers
  (``SAMPLERS``); the ratio ones take a rate from 0 to 1. The local deployment and the
  Kubernetes manifests set ``parentbased_traceidratio`` at the topology's
  ``tracing.sample_percent``: a call that comes through a sidecar keeps the proxy's
  decision, a call that reaches the service directly is sampled at the same rate.
* ``OTEL_BSP_*``, ``OTEL_PROPAGATORS``: read by the SDK itself.

Spans carry no secret: the gRPC instrumentation records the method, peer and status,
never metadata (so never the ``authorization`` header); database spans carry a summary
of the statement (operation and table), never its text or parameters; the request
attributes recorded are the client's ``request_id`` and resource ids.
"""

from __future__ import annotations

import functools
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import grpc
from google.protobuf.message import Message
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.instrumentation.grpc import (
    client_interceptor,
    filters,
    grpcext,
    server_interceptor,
)
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import Span, SpanProcessor, TracerProvider, sampling
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import SpanKind, Status, StatusCode
from sqlalchemy import event
from sqlalchemy.engine import Engine

from services.common.config import ConfigError

log = logging.getLogger(__name__)

HEALTH_SERVICE = "grpc.health.v1.Health"
TRUE_VALUES = frozenset({"true"})
FALSE_VALUES = frozenset({"", "false"})

# Span attributes of our own (namespaced, as the semantic conventions ask).
REQUEST_ID = "meshbank.request_id"
TRANSFER_ID = "meshbank.transfer_id"
ACCOUNT_ID = "meshbank.account_id"

# gRPC codes that are the server's fault: the span's status becomes ERROR (semantic
# conventions for RPC server spans); a client's mistake (INVALID_ARGUMENT, ...) is not.
SERVER_ERRORS = frozenset(
    {
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.INTERNAL,
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DATA_LOSS,
    }
)


# The spec's OTEL_TRACES_SAMPLER values; the ratio samplers take OTEL_TRACES_SAMPLER_ARG.
SAMPLERS: dict[str, Callable[[float], sampling.Sampler]] = {
    "always_on": lambda _rate: sampling.ALWAYS_ON,
    "always_off": lambda _rate: sampling.ALWAYS_OFF,
    "traceidratio": sampling.TraceIdRatioBased,
    "parentbased_always_on": lambda _rate: sampling.ParentBased(sampling.ALWAYS_ON),
    "parentbased_always_off": lambda _rate: sampling.ParentBased(sampling.ALWAYS_OFF),
    "parentbased_traceidratio": sampling.ParentBasedTraceIdRatio,
}
DEFAULT_SAMPLER = "parentbased_always_on"  # the spec's default


@dataclass(frozen=True)
class TracingConfig:
    """What ``OTEL_*`` asks for, validated."""

    enabled: bool
    endpoint: str | None
    sampler: str = DEFAULT_SAMPLER
    sample_rate: float = 1.0

    def build_sampler(self) -> sampling.Sampler:
        return SAMPLERS[self.sampler](self.sample_rate)

    @property
    def exporting(self) -> bool:
        return self.enabled and self.endpoint is not None


def load_config(env: Mapping[str, str]) -> TracingConfig:
    """Validate the ``OTEL_*`` variables this process honours, or raise ConfigError."""
    problems: list[str] = []
    disabled = env.get("OTEL_SDK_DISABLED", "").strip().lower()
    if disabled not in TRUE_VALUES | FALSE_VALUES:
        problems.append(f"OTEL_SDK_DISABLED={disabled!r} must be true or false")
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower() or "otlp"
    if exporter not in ("otlp", "none"):
        problems.append(
            f"OTEL_TRACES_EXPORTER={exporter!r} is not supported (otlp or none; "
            "only the OTLP/gRPC exporter is installed)"
        )
    for name in ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL"):
        protocol = env.get(name, "").strip()
        if protocol and protocol != "grpc":
            problems.append(f"{name}={protocol!r} is not supported (grpc)")
    name = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"
    endpoint = env.get(name, "").strip()
    if not endpoint:
        name = "OTEL_EXPORTER_OTLP_ENDPOINT"
        endpoint = env.get(name, "").strip()
    if endpoint:
        parts = urlsplit(endpoint)
        try:
            port = parts.port
        except ValueError:
            port = None
        if parts.scheme not in ("http", "https") or not parts.hostname or port is None:
            problems.append(
                f"{name}={endpoint!r} must be http(s)://host:port (http = plaintext, https = TLS)"
            )
    sampler = env.get("OTEL_TRACES_SAMPLER", "").strip().lower() or DEFAULT_SAMPLER
    if sampler not in SAMPLERS:
        problems.append(f"OTEL_TRACES_SAMPLER={sampler!r} is not supported ({', '.join(SAMPLERS)})")
    rate = 1.0
    raw_rate = env.get("OTEL_TRACES_SAMPLER_ARG", "").strip()
    if raw_rate and sampler.endswith("traceidratio"):
        try:
            rate = float(raw_rate)
        except ValueError:
            rate = -1.0
        if not 0.0 <= rate <= 1.0:
            problems.append(f"OTEL_TRACES_SAMPLER_ARG={raw_rate!r} must be a rate from 0 to 1")
    if problems:
        raise ConfigError("invalid tracing configuration:\n  " + "\n  ".join(problems))
    enabled = disabled not in TRUE_VALUES
    return TracingConfig(
        enabled=enabled,
        endpoint=endpoint if endpoint and exporter == "otlp" else None,
        sampler=sampler,
        sample_rate=rate,
    )


def resource(
    env: Mapping[str, str], *, service: str, region: str, zone: str, instance_id: str
) -> Resource:
    """The service's resource: our defaults, overridden by OTEL_RESOURCE_ATTRIBUTES and
    OTEL_SERVICE_NAME (``Resource.create`` would let code win over the environment)."""
    defaults: dict[str, str] = {"service.name": service, "service.namespace": "meshbank"}
    if region:
        defaults["cloud.region"] = region
    if zone:
        defaults["cloud.availability_zone"] = zone
    if instance_id:
        defaults["service.instance.id"] = instance_id
    # Resource.create adds the SDK's own attributes (telemetry.sdk.*); the attributes
    # given to it win over os.environ, so the environment's are merged in first.
    return Resource.create({**defaults, **parse_resource_attributes(env)})


def parse_resource_attributes(env: Mapping[str, str]) -> dict[str, str]:
    """OTEL_RESOURCE_ATTRIBUTES (``k=v,k2=v2``, values percent-encoded) and
    OTEL_SERVICE_NAME, which wins over a service.name in the former (the spec's order)."""
    attributes: dict[str, str] = {}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    if env.get("OTEL_SERVICE_NAME", "").strip():
        attributes["service.name"] = env["OTEL_SERVICE_NAME"].strip()
    return attributes


def build_provider(
    env: Mapping[str, str],
    *,
    service: str,
    region: str = "",
    zone: str = "",
    instance_id: str = "",
) -> TracerProvider | None:
    """The tracer provider ``env`` asks for (not installed); None when the SDK is disabled.

    The exporter's gRPC channel connects lazily, on the first export, and a collector
    that is down only costs dropped spans (logged by the SDK), never a failed request.
    """
    config = load_config(env)
    if not config.enabled:
        return None
    res = resource(env, service=service, region=region, zone=zone, instance_id=instance_id)
    provider = TracerProvider(resource=res, sampler=config.build_sampler())
    provider.add_span_processor(IdentityOnSpans(res))
    if config.exporting:
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        # The exporter reads the other OTEL_EXPORTER_OTLP_* variables (headers,
        # certificates, timeout, compression) itself.
        exporter = OTLPSpanExporter(endpoint=config.endpoint)
        provider.add_span_processor(BatchSpanProcessor(exporter))
    return provider


def setup(
    env: Mapping[str, str],
    *,
    service: str,
    region: str = "",
    zone: str = "",
    instance_id: str = "",
) -> TracerProvider | None:
    """Build the provider from ``env`` and install it as the process's global one."""
    provider = build_provider(
        env, service=service, region=region, zone=zone, instance_id=instance_id
    )
    if provider is None:
        log.info("tracing disabled (OTEL_SDK_DISABLED)")
        return None
    endpoint = load_config(env).endpoint
    if endpoint:
        log.info("exporting traces over OTLP/gRPC to %s", endpoint)
    else:
        log.info("no OTLP endpoint configured: spans are not exported")
    trace.set_tracer_provider(provider)
    return provider


# Resource attributes copied onto every span: some UIs (Phoenix among them) show only
# span attributes, and which region and instance served a span is the first question
# during a failover. The names match the Envoy spans' tags (mesh/envoy.py).
SPAN_IDENTITY = {
    "service.name": "meshbank.service",
    "cloud.region": "meshbank.region",
    "cloud.availability_zone": "meshbank.zone",
    "service.instance.id": "meshbank.instance",
}


class IdentityOnSpans(SpanProcessor):
    """Sets the process's identity (service, region, zone, instance) on each span."""

    def __init__(self, res: Resource) -> None:
        self._attributes = {
            span_key: str(res.attributes[key])
            for key, span_key in SPAN_IDENTITY.items()
            if key in res.attributes
        }

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:  # noqa: ARG002
        span.set_attributes(self._attributes)


# -- gRPC ------------------------------------------------------------------------------


def _not_health(details: Any) -> bool:
    return not str(getattr(details, "method", "")).startswith(f"/{HEALTH_SERVICE}/")


def server_interceptors(
    tracer_provider: trace.TracerProvider | None = None,
) -> list[grpc.ServerInterceptor]:
    """The interceptors every service's server runs: a SERVER span per call (health
    checks excluded), then the request attributes and failure log inside that span.

    By default they use the global tracer provider: no-ops until ``setup`` installs one.
    """
    not_health = filters.negate(filters.service_name(HEALTH_SERVICE))
    spans: grpc.ServerInterceptor = server_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider, filter_=not_health
    )
    return [spans, RequestAttributes()]


def traced_channel(
    channel: grpc.Channel, tracer_provider: trace.TracerProvider | None = None
) -> grpc.Channel:
    """Wrap an outgoing channel: a CLIENT span per call and ``traceparent`` on the wire.

    Every call a service makes to another service must go through such a channel, so
    the callee's spans join the caller's trace.
    """
    not_health = filters.negate(filters.service_name(HEALTH_SERVICE))
    interceptor = client_interceptor(  # type: ignore[no-untyped-call]
        tracer_provider, filter_=not_health
    )
    # The instrumentation's interceptor is of its own grpcext kind, not grpc's.
    intercepted: grpc.Channel = grpcext.intercept_channel(  # type: ignore[no-untyped-call]
        channel, interceptor
    )
    return intercepted


def _field(message: Any, name: str) -> str:
    """A string field of a proto message, or "" when it has no such field."""
    if not isinstance(message, Message) or name not in message.DESCRIPTOR.fields_by_name:
        return ""
    value = getattr(message, name)
    return value if isinstance(value, str) else ""


def request_attributes(request: Any) -> dict[str, str]:
    """The ids worth searching spans by: the client's request_id and resource ids."""
    found = {
        REQUEST_ID: _field(request, "request_id"),
        TRANSFER_ID: _field(request, "transfer_id"),
        ACCOUNT_ID: _field(request, "account_id"),
    }
    return {k: v for k, v in found.items() if v}


def response_attributes(response: Any) -> dict[str, str]:
    """The id of what the call created (CreateTransfer's transfer, OpenAccount's account)."""
    found: dict[str, str] = {}
    for attr, key in (("transfer", TRANSFER_ID), ("account", ACCOUNT_ID)):
        if isinstance(response, Message) and attr in response.DESCRIPTOR.fields_by_name:
            value = _field(getattr(response, attr), f"{attr}_id")
            if value:
                found[key] = value
    return found


class RequestAttributes(grpc.ServerInterceptor):
    """Runs inside the call's span: records request_id / transfer id on it, the gRPC code
    of calls ended with ``abort_with_status`` (which the instrumentation misses), and
    logs each failed call with its request_id, so a log line leads to the trace."""

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        method = str(getattr(handler_call_details, "method", ""))
        if handler is None or handler.unary_unary is None or not _not_health(handler_call_details):
            return handler
        behavior = handler.unary_unary

        def traced(request: Any, context: grpc.ServicerContext) -> Any:
            span = trace.get_current_span()
            attributes = request_attributes(request)
            span.set_attributes(attributes)
            try:
                response = behavior(request, context)
            except BaseException:
                _record_failure(span, method, context, attributes)
                raise
            span.set_attributes(response_attributes(response))
            return response

        return grpc.unary_unary_rpc_method_handler(
            traced,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _record_failure(
    span: trace.Span, method: str, context: grpc.ServicerContext, attributes: Mapping[str, str]
) -> None:
    code = context.code()  # type: ignore[attr-defined]
    if not isinstance(code, grpc.StatusCode):
        code = grpc.StatusCode.UNKNOWN  # an exception that escaped without a status
    span.set_attribute("rpc.grpc.status_code", code.value[0])
    if code in SERVER_ERRORS:
        span.set_status(Status(StatusCode.ERROR, code.name))
    level = logging.WARNING if code in SERVER_ERRORS else logging.INFO
    log.log(
        level,
        "%s failed: %s",
        method,
        code.name,
        extra={
            "rpc_method": method,
            "grpc_code": code.name,
            "request_id": attributes.get(REQUEST_ID, ""),
        },
    )


# -- database --------------------------------------------------------------------------

_COMMENTS = re.compile(r"--[^\n]*|/\*.*?\*/", re.DOTALL)
_IDENT = r'"?([A-Za-z_][A-Za-z0-9_$.]*)"?'
_TABLE_AFTER = {
    "SELECT": re.compile(rf"\bFROM\s+{_IDENT}", re.IGNORECASE),
    "INSERT": re.compile(rf"\bINTO\s+{_IDENT}", re.IGNORECASE),
    "UPDATE": re.compile(rf"^\s*UPDATE\s+(?:ONLY\s+)?{_IDENT}", re.IGNORECASE),
    "DELETE": re.compile(rf"\bFROM\s+{_IDENT}", re.IGNORECASE),
}


@functools.lru_cache(maxsize=1024)  # a service sends a few dozen distinct statements
def summarize(statement: str) -> tuple[str, str]:
    """(operation, summary) of a SQL statement, e.g. ("SELECT", "SELECT accounts").

    Only keywords and a table name: never literals, so a statement that inlines a value
    cannot leak it into a span. A WITH query is summarised by the statement it ends in.
    """
    text = _COMMENTS.sub(" ", statement).strip()
    words = text.split(None, 1)
    if not words:
        return "", ""
    operation = words[0].upper()
    if not operation.isalpha():
        return "", ""
    if operation == "WITH":
        tail = _main_statement(text)
        if tail:
            operation, text = tail.split(None, 1)[0].upper(), tail
    pattern = _TABLE_AFTER.get(operation)
    match = pattern.search(text) if pattern else None
    if match:
        return operation, f"{operation} {match.group(1)}"
    return operation, operation


_MAIN_KEYWORD = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE)\b", re.IGNORECASE)


def _main_statement(text: str) -> str:
    """The statement a WITH query ends in: the first DML keyword outside parentheses."""
    depth = 0
    for i, char in enumerate(text):
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        elif (
            depth == 0
            and (match := _MAIN_KEYWORD.match(text, i))
            and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_"))
        ):
            return text[match.start() :]
    return ""


def instrument_engine(engine: Engine, tracer_provider: trace.TracerProvider | None = None) -> None:
    """A CLIENT span per statement and per COMMIT, children of the call's span.

    Why SQLAlchemy events and not opentelemetry-instrumentation-sqlalchemy: its newest
    release (0.66b1) pins opentelemetry-instrumentation 0.66b1 while the gRPC
    instrumentation we use pins 0.66b2, so the two cannot be installed together; and it
    records the full statement text, where we want only its summary.
    """
    system = "cockroachdb" if engine.dialect.name == "cockroachdb" else "postgresql"
    url = engine.url
    base: dict[str, Any] = {"db.system": system, "db.system.name": system}
    if url.database:
        base["db.namespace"] = url.database
    if url.host:
        base["server.address"] = url.host
    if url.port:
        base["server.port"] = url.port
    tracer = trace.get_tracer("meshbank.db", tracer_provider=tracer_provider)

    def before(
        _conn: Any, _cursor: Any, statement: str, _params: Any, context: Any, _many: bool
    ) -> None:
        if context is None:
            return
        current = trace.get_current_span()
        if current.get_span_context().is_valid and not current.is_recording():
            return  # inside a call that is not sampled: its statements are not either
        operation, summary = summarize(statement)
        attributes = dict(base)
        if operation:
            attributes["db.operation.name"] = operation
            attributes["db.query.summary"] = summary
        span = tracer.start_span(summary or system, kind=SpanKind.CLIENT, attributes=attributes)
        context._meshbank_span = span

    def after(
        _conn: Any, _cursor: Any, _statement: str, _params: Any, context: Any, _many: bool
    ) -> None:
        span = getattr(context, "_meshbank_span", None)
        if span is not None:
            span.end()
            context._meshbank_span = None

    def on_error(exception_context: Any) -> None:
        context = exception_context.execution_context
        span = getattr(context, "_meshbank_span", None)
        if span is None:
            return
        _mark_db_error(span, exception_context.original_exception)
        span.end()
        context._meshbank_span = None

    event.listen(engine, "before_cursor_execute", before)
    event.listen(engine, "after_cursor_execute", after)
    event.listen(engine, "handle_error", on_error)
    _trace_commits(engine, tracer, base)


def _mark_db_error(span: trace.Span, error: BaseException) -> None:
    sqlstate = getattr(error, "sqlstate", None)
    if sqlstate:
        span.set_attribute("db.response.status_code", str(sqlstate))
    span.set_attribute("error.type", type(error).__name__)
    # The message of a database error may quote a value (a unique violation's key):
    # only its class and SQLSTATE go on the span.
    span.set_status(Status(StatusCode.ERROR, str(sqlstate or type(error).__name__)))


def _trace_commits(engine: Engine, tracer: trace.Tracer, base: Mapping[str, Any]) -> None:
    """A span around each COMMIT: with synchronous replication that is where a write
    waits for the standby in another region, so it is the span worth seeing.

    SQLAlchemy has no after-commit connection event, so the engine's own dialect
    instance gets a wrapped ``do_commit`` (each engine has its own dialect object).
    """
    dialect = engine.dialect
    commit = dialect.do_commit
    attributes = {**base, "db.operation.name": "COMMIT", "db.query.summary": "COMMIT"}

    def do_commit(dbapi_connection: Any) -> None:
        with tracer.start_as_current_span(
            "COMMIT",
            kind=SpanKind.CLIENT,
            attributes=attributes,
            record_exception=False,
            set_status_on_exception=False,
        ) as span:
            try:
                commit(dbapi_connection)
            except BaseException as exc:
                _mark_db_error(span, exc)
                raise

    dialect.do_commit = do_commit  # type: ignore[method-assign]
