"""The gRPC server every meshbank service runs in.

Follows grpc's examples: ``run_server`` is a context manager that yields the bound
port (tests bind port 0), registers the stock health service and server reflection,
and ``serve`` shuts down gracefully on SIGTERM: health goes NOT_SERVING first so load
balancers stop sending, in-flight calls drain for the grace period, then the server stops.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass
from types import FrameType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.common import telemetry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Registration:
    """One gRPC service to host: its full name, servicer and generated ``add_*`` function."""

    name: str
    servicer: Any
    add: Callable[[Any, grpc.Server], None]


@dataclass
class RunningServer:
    server: grpc.Server
    health: health.HealthServicer
    port: int
    names: Sequence[str]

    def stop(self, grace: float) -> None:
        """Health to NOT_SERVING, drain in-flight calls for ``grace`` seconds, stop."""
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait()


@contextmanager
def run_server(
    registrations: Sequence[Registration],
    address: str,
    *,
    workers: int = 16,
    grace: float = 5.0,
    reflect: Sequence[str] = (),
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> Iterator[RunningServer]:
    """Serve ``registrations`` on ``address``; reflection also describes ``reflect``.

    Every process describes the whole API by reflection (descriptors only), so grpcurl
    works through the edge, which routes reflection to any one service.
    """
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="grpc"),
        # A port clash must fail loudly instead of silently sharing the port with an
        # orphaned server (grpc-python enables SO_REUSEPORT by default).
        options=[("grpc.so_reuseport", 0), ("grpc.max_receive_message_length", 1 << 20)],
        # Outermost first: a span per call (health checks excluded) under the caller's
        # traceparent, then the caller's own (RED metrics), timed inside the span.
        interceptors=[*telemetry.server_interceptors(), *interceptors],
    )
    health_servicer = health.HealthServicer(experimental_non_blocking=True)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for reg in registrations:
        reg.add(reg.servicer, server)
    names = [reg.name for reg in registrations]
    described = sorted({*names, *reflect})
    reflection.enable_server_reflection(
        [*described, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    for name in ["", *names]:
        health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    running = RunningServer(server, health_servicer, port, names)
    try:
        yield running
    finally:
        running.stop(grace)


def serve(
    registrations: Sequence[Registration],
    address: str,
    *,
    workers: int,
    grace: float,
    reflect: Sequence[str] = (),
    interceptors: Sequence[grpc.ServerInterceptor] = (),
) -> None:
    """Serve until SIGTERM or SIGINT, then shut down gracefully."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, shutting down", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    with run_server(
        registrations,
        address,
        workers=workers,
        grace=grace,
        reflect=reflect,
        interceptors=interceptors,
    ) as running:
        log.info("serving %s on port %d", ", ".join(running.names), running.port)
        stop.wait()
