"""Prometheus metrics of one service process, served on its own HTTP port.

* RED per gRPC method, from a server interceptor, under the names of
  go-grpc-prometheus (``grpc_server_started_total``, ``grpc_server_handled_total``,
  ``grpc_server_handling_seconds``) so existing gRPC dashboards and alert rules work.
* The ledger's business counters (``LedgerEvents``, reported after the commit):
  transfers committed and minor units moved per currency, idempotent replays.
* The retry helper's retries by SQLSTATE class and its reconnects after a lost
  connection or a failover (``services.common.db.retry_cause``).

Each ``ServiceMetrics`` has its own registry instead of prometheus_client's global
one: building the app twice in one process (tests) cannot collide, and a test reads
exactly the metrics of the app it built. Region, zone, service and instance are not
metric labels: Prometheus attaches them from the scrape target (``regions/prometheus.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import grpc
from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Histogram,
    start_http_server,
)

from services.common import db

# gRPC latencies here run from ~1 ms (a cached read) to seconds (a transfer that
# waits out a failover): buckets dense where the p99 alert's threshold lives.
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

# Label values created at start so that rate() sees the first increment of each
# (a series born with the value 1 has no earlier sample to compute an increase from).
KNOWN_SQLSTATE_CLASSES = ("40", "25", "57", "53", "08", "23", "none", "ambiguous_commit")
KNOWN_RECONNECT_CAUSES = (
    "connection_lost",
    "read_only_standby",
    "server_shutdown",
    "server_starting",
)


def _split(full_method: str) -> tuple[str, str]:
    """``/pkg.Service/Method`` -> (``pkg.Service``, ``Method``)."""
    _, _, rest = full_method.partition("/")
    service, _, method = rest.partition("/")
    return service, method


def _code(context: grpc.ServicerContext, default: grpc.StatusCode) -> str:
    # context.abort() / abort_with_status() record the code on the context and raise;
    # a handler that raises anything else ends as UNKNOWN in grpc-python.
    # (ServicerContext.code() exists since grpcio 1.38; the type stubs lack it.)
    code: grpc.StatusCode | None = getattr(context, "code", lambda: None)()
    return str((code or default).name)


@dataclass(frozen=True)
class _Method:
    service: str
    method: str
    kind: str


class ServiceMetrics:
    """The metrics of one service process; implements ``LedgerEvents`` and a retry observer."""

    def __init__(self, *, process_collectors: bool = True) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        if process_collectors:
            # The standard process_* / python_* series (CPU, memory, open fds, GC).
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                self.registry.register(collector)
        method_labels = ("grpc_service", "grpc_method", "grpc_type")
        r = self.registry
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", method_labels, registry=r
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code.",
            (*method_labels, "grpc_code"),
            registry=r,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC on the server to its end.",
            method_labels,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.transfers = Counter(
            "meshbank_transfers_committed",
            "Transfers committed (replays excluded).",
            ("currency",),
            registry=r,
        )
        self.amount = Counter(
            "meshbank_transfer_amount_minor",
            "Minor units moved by committed transfers, per ISO-4217 currency.",
            ("currency",),
            registry=r,
        )
        self.replays = Counter(
            "meshbank_idempotent_replays",
            "Requests whose request_id was seen before: the stored response was returned.",
            ("method",),
            registry=r,
        )
        self.retries = Counter(
            "meshbank_db_retries",
            "Whole-transaction re-runs by the retry helper, by SQLSTATE class of the error.",
            ("sqlstate_class",),
            registry=r,
        )
        self.reconnects = Counter(
            "meshbank_db_reconnects",
            "Transactions re-run on a new connection after a lost connection or a failover.",
            ("cause",),
            registry=r,
        )
        for sqlstate_class in KNOWN_SQLSTATE_CLASSES:
            self.retries.labels(sqlstate_class)
        for cause in KNOWN_RECONNECT_CAUSES:
            self.reconnects.labels(cause)

    # -- LedgerEvents ------------------------------------------------------------------

    def transfer_committed(self, currency_code: str, amount_minor: int) -> None:
        self.transfers.labels(currency_code).inc()
        self.amount.labels(currency_code).inc(amount_minor)

    def request_replayed(self, method: str) -> None:
        self.replays.labels(method).inc()

    # -- the retry helper's observer ---------------------------------------------------

    def observe_retry(self, attempt: int, exc: BaseException) -> None:
        """A ``services.common.db.RetryObserver``: one call per failed attempt."""
        del attempt
        cause = db.retry_cause(exc)
        self.retries.labels(cause.sqlstate_class).inc()
        if cause.reconnect is not None:
            self.reconnects.labels(cause.reconnect).inc()

    # -- RED -------------------------------------------------------------------------

    def interceptor(self) -> grpc.ServerInterceptor:
        return RedInterceptor(self)

    def _record(self, m: _Method, code: str, seconds: float) -> None:
        self.handled.labels(m.service, m.method, m.kind, code).inc()
        self.handling.labels(m.service, m.method, m.kind).observe(seconds)

    def serve(self, address: str) -> MetricsServer:
        return serve_registry(self.registry, address)


def serve_registry(registry: CollectorRegistry, address: str) -> MetricsServer:
    """Serve ``/metrics`` of ``registry`` on ``address`` (host:port; port 0 picks one),
    from a daemon thread; ``stop()`` closes the socket."""
    host, _, port = address.rpartition(":")
    server, thread = start_http_server(int(port), host, registry=registry)
    return MetricsServer(server, thread)


@dataclass
class MetricsServer:
    server: Any  # prometheus_client's WSGI server (untyped)
    thread: Any

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


class RedInterceptor(grpc.ServerInterceptor):
    """Counts every RPC of a registered method: started, handled by code, duration.

    Unknown methods are not counted (grpc answers UNIMPLEMENTED): method names come
    from clients, and counting them would let any caller create new time series.
    """

    def __init__(self, metrics: ServiceMetrics) -> None:
        self._metrics = metrics

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler[Any, Any] | None],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split(handler_call_details.method)
        streams = (handler.request_streaming, handler.response_streaming)
        kind = {
            (False, False): "unary",
            (False, True): "server_stream",
            (True, False): "client_stream",
            (True, True): "bidi_stream",
        }[streams]
        m = _Method(service, method, kind)
        serializers = {
            "request_deserializer": handler.request_deserializer,
            "response_serializer": handler.response_serializer,
        }
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._unary(m, handler.unary_unary), **serializers
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._unary(m, handler.stream_unary), **serializers
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(m, handler.unary_stream), **serializers
            )
        assert handler.stream_stream is not None
        return grpc.stream_stream_rpc_method_handler(
            self._streaming(m, handler.stream_stream), **serializers
        )

    def _unary(
        self, m: _Method, behavior: Callable[[Any, grpc.ServicerContext], Any]
    ) -> Callable[[Any, grpc.ServicerContext], Any]:
        metrics = self._metrics

        def wrapper(request: Any, context: grpc.ServicerContext) -> Any:
            metrics.started.labels(m.service, m.method, m.kind).inc()
            start = time.perf_counter()
            code = "UNKNOWN"
            try:
                response = behavior(request, context)
                code = _code(context, grpc.StatusCode.OK)
                return response
            except Exception:
                code = _code(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                metrics._record(m, code, time.perf_counter() - start)

        return wrapper

    def _streaming(
        self, m: _Method, behavior: Callable[[Any, grpc.ServicerContext], Iterator[Any]]
    ) -> Callable[[Any, grpc.ServicerContext], Iterator[Any]]:
        metrics = self._metrics

        def wrapper(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            metrics.started.labels(m.service, m.method, m.kind).inc()
            start = time.perf_counter()
            code = "UNKNOWN"
            try:
                yield from behavior(request, context)
                code = _code(context, grpc.StatusCode.OK)
            except GeneratorExit:
                code = "CANCELLED"  # the client went away mid-stream
                raise
            except Exception:
                code = _code(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                metrics._record(m, code, time.perf_counter() - start)

        return wrapper
