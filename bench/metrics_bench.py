"""What the RED interceptor costs per call: one gRPC server on loopback, with and without it.

A unary echo method is called sequentially by one client over a real socket; blocks of
calls alternate between a server with the metrics interceptor and one without, so a
change of background load on a shared machine hits both alike. It prints p50/p99 per
server and the p50 difference (the interceptor's cost: two counters, one histogram
observation, a clock read). Nothing is asserted: the figures are for reading.

    .venv/bin/python -m bench.metrics_bench [--calls N] [--blocks B]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from typing import Any

import grpc

from services.common.metrics import ServiceMetrics

SERVICE = "bench.v1.EchoService"


def _echo(request: bytes, _context: grpc.ServicerContext) -> bytes:
    return request


@contextmanager
def _server(interceptors: list[grpc.ServerInterceptor]) -> Iterator[int]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4), interceptors=interceptors)
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Echo": grpc.unary_unary_rpc_method_handler(_echo)
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield port
    finally:
        server.stop(0).wait()


def _percentile(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=500, help="calls per block")
    parser.add_argument("--blocks", type=int, default=10, help="blocks per server")
    args = parser.parse_args()
    metrics = ServiceMetrics(process_collectors=False)
    samples: dict[str, list[float]] = {"without": [], "with": []}
    with (
        _server([]) as plain,
        _server([metrics.interceptor()]) as instrumented,
        grpc.insecure_channel(f"127.0.0.1:{plain}") as plain_channel,
        grpc.insecure_channel(f"127.0.0.1:{instrumented}") as instrumented_channel,
    ):
        calls: dict[str, grpc.UnaryUnaryMultiCallable[bytes, bytes]] = {
            "without": plain_channel.unary_unary(f"/{SERVICE}/Echo"),
            "with": instrumented_channel.unary_unary(f"/{SERVICE}/Echo"),
        }
        for call in calls.values():  # connect and warm up
            for _ in range(50):
                call(b"x", timeout=5)
        for _ in range(args.blocks):
            for name, call in calls.items():
                for _ in range(args.calls):
                    start = time.perf_counter()
                    call(b"x", timeout=5)
                    samples[name].append(time.perf_counter() - start)
    for name, values in samples.items():
        print(
            f"{name:>8} interceptor: p50 {statistics.median(values) * 1e6:7.1f} us"
            f"  p99 {_percentile(values, 0.99) * 1e6:7.1f} us  ({len(values)} calls)"
        )
    cost = statistics.median(samples["with"]) - statistics.median(samples["without"])
    print(f"RED interceptor cost at p50: {cost * 1e6:+.1f} us per call")


if __name__ == "__main__":
    main()
