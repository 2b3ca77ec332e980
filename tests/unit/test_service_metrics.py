"""Service metrics: the RED interceptor on a real gRPC server, the /metrics endpoint,
the retry helper's counters and the ledger's business counters."""

from __future__ import annotations

import urllib.request
import uuid
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
import sqlalchemy as sa

from services.common import config as config_mod
from services.common import db, errors
from services.common.metrics import ServiceMetrics
from services.common.principal import ALL_SCOPES, USER_SCOPES, Principal
from services.ledger.handlers import LedgerService, MoveMoney, OpenAccount, RequestKey
from tests.fakes.ledger import FakeRunner

SERVICE = "test.v1.EchoService"


def _ok(request: bytes, context: grpc.ServicerContext) -> bytes:
    return request


def _not_found(request: bytes, context: grpc.ServicerContext) -> bytes:
    context.abort(grpc.StatusCode.NOT_FOUND, "no such thing")


def _crash(request: bytes, context: grpc.ServicerContext) -> bytes:
    raise ValueError("a bug")


def _stream(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
    yield from (request, request, request)


@pytest.fixture
def served() -> Iterator[tuple[ServiceMetrics, grpc.Channel]]:
    metrics = ServiceMetrics(process_collectors=False)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=4),
        interceptors=[metrics.interceptor()],
    )
    handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {
        "Ok": grpc.unary_unary_rpc_method_handler(_ok),
        "NotFound": grpc.unary_unary_rpc_method_handler(_not_found),
        "Crash": grpc.unary_unary_rpc_method_handler(_crash),
        "Stream": grpc.unary_stream_rpc_method_handler(_stream),
    }
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(SERVICE, handlers)])
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield metrics, channel
    finally:
        channel.close()
        server.stop(0).wait()


def unary(channel: grpc.Channel, method: str) -> grpc.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(f"/{SERVICE}/{method}")  # bytes in, bytes out


def streaming(channel: grpc.Channel) -> grpc.UnaryStreamMultiCallable[bytes, bytes]:
    return channel.unary_stream(f"/{SERVICE}/Stream")


def handled(metrics: ServiceMetrics, method: str, code: str, kind: str = "unary") -> float:
    labels = {"grpc_service": SERVICE, "grpc_method": method, "grpc_type": kind, "grpc_code": code}
    return metrics.registry.get_sample_value("grpc_server_handled_total", labels) or 0.0


def test_red_metrics_count_every_call_by_method_and_code(
    served: tuple[ServiceMetrics, grpc.Channel],
) -> None:
    metrics, channel = served
    for _ in range(3):
        assert unary(channel, "Ok")(b"hi", timeout=5) == b"hi"
    with pytest.raises(grpc.RpcError) as not_found:
        unary(channel, "NotFound")(b"x", timeout=5)
    assert not_found.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as crash:
        unary(channel, "Crash")(b"x", timeout=5)
    assert crash.value.code() == grpc.StatusCode.UNKNOWN
    assert list(streaming(channel)(b"s", timeout=5)) == [b"s"] * 3

    assert handled(metrics, "Ok", "OK") == 3
    assert handled(metrics, "NotFound", "NOT_FOUND") == 1
    assert handled(metrics, "Crash", "UNKNOWN") == 1
    assert handled(metrics, "Stream", "OK", "server_stream") == 1
    labels = {"grpc_service": SERVICE, "grpc_method": "Ok", "grpc_type": "unary"}
    get = metrics.registry.get_sample_value
    assert get("grpc_server_started_total", labels) == 3
    assert get("grpc_server_handling_seconds_count", labels) == 3
    assert (get("grpc_server_handling_seconds_sum", labels) or 0) > 0


def test_unknown_methods_are_not_counted(served: tuple[ServiceMetrics, grpc.Channel]) -> None:
    """Method names come from clients: counting them would let anyone add time series."""
    metrics, channel = served
    with pytest.raises(grpc.RpcError) as exc:
        unary(channel, "NoSuchMethod")(b"x", timeout=5)
    assert exc.value.code() == grpc.StatusCode.UNIMPLEMENTED
    exposed = {s.labels.get("grpc_method") for m in metrics.registry.collect() for s in m.samples}
    assert "NoSuchMethod" not in exposed


def test_metrics_endpoint_serves_the_registry_over_http() -> None:
    metrics = ServiceMetrics()
    metrics.transfer_committed("EUR", 1250)
    server = metrics.serve("127.0.0.1:0")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.port}/metrics", timeout=5) as r:
            body = r.read().decode()
    finally:
        server.stop()
    assert 'meshbank_transfers_committed_total{currency="EUR"} 1.0' in body
    assert 'meshbank_transfer_amount_minor_total{currency="EUR"} 1250.0' in body
    assert "process_cpu_seconds_total" in body  # the standard process metrics


class _Orig(Exception):
    def __init__(self, sqlstate: str | None) -> None:
        super().__init__(sqlstate)
        self.sqlstate = sqlstate


def _db_error(sqlstate: str | None, invalidated: bool = False) -> sa.exc.DBAPIError:
    return sa.exc.OperationalError(
        "COMMIT", {}, _Orig(sqlstate), connection_invalidated=invalidated
    )


@pytest.mark.parametrize(
    ("exc", "sqlstate_class", "reconnect"),
    [
        (_db_error("40001"), "40", None),
        (_db_error("40P01"), "40", None),
        (_db_error("25006"), "25", "read_only_standby"),
        (_db_error("57P01"), "57", "server_shutdown"),
        (_db_error("08006"), "08", "connection_lost"),
        (_db_error(None), "none", "connection_lost"),
        (_db_error("40001", invalidated=True), "40", "connection_lost"),
        (db.AmbiguousCommitError("committed locally"), "ambiguous_commit", None),
    ],
)
def test_retries_are_counted_by_sqlstate_class_and_failovers_as_reconnects(
    exc: BaseException, sqlstate_class: str, reconnect: str | None
) -> None:
    assert db.is_retryable(exc)
    metrics = ServiceMetrics(process_collectors=False)
    metrics.observe_retry(1, exc)
    get = metrics.registry.get_sample_value
    assert get("meshbank_db_retries_total", {"sqlstate_class": sqlstate_class}) == 1
    reconnects = {
        s.labels["cause"]: s.value
        for m in metrics.registry.collect()
        for s in m.samples
        if s.name == "meshbank_db_reconnects_total"
    }
    assert reconnects == {cause: (1.0 if cause == reconnect else 0.0) for cause in reconnects}, (
        reconnects
    )
    if reconnect is not None:
        assert reconnects[reconnect] == 1


def test_ledger_counts_committed_transfers_amounts_and_replays() -> None:
    metrics = ServiceMetrics(process_collectors=False)
    ledger = LedgerService(FakeRunner(), events=metrics)
    bank = Principal("partners/bank", ALL_SCOPES)
    alice = Principal("users/alice", USER_SCOPES)

    def open_account(who: Principal, rid: str, overdraft: int = 0) -> uuid.UUID:
        outcome = ledger.create_account(
            who,
            OpenAccount("", "a", "USD", overdraft),
            RequestKey(rid, "CreateAccount", b"a"),
            lambda a: str(a.account_id).encode(),
        )
        return uuid.UUID(outcome.response.decode())

    treasury, wallet = open_account(bank, "t", 10**9), open_account(alice, "w")
    open_account(alice, "w")  # a replay

    def pay(who: Principal, src: uuid.UUID, dst: uuid.UUID, amount: int, rid: str) -> None:
        ledger.create_transfer(
            who,
            MoveMoney(src, dst, amount, "USD", ""),
            RequestKey(rid, "CreateTransfer", f"{src}{amount}".encode()),
            lambda _t: b"ok",
        )

    pay(bank, treasury, wallet, 700, "p1")
    pay(bank, treasury, wallet, 300, "p2")
    pay(bank, treasury, wallet, 300, "p2")  # a replay: no money moves, nothing counted
    with pytest.raises(errors.FailedPrecondition):
        pay(alice, wallet, treasury, 5000, "p3")  # insufficient funds: rolled back

    get = metrics.registry.get_sample_value
    assert get("meshbank_transfers_committed_total", {"currency": "USD"}) == 2
    assert get("meshbank_transfer_amount_minor_total", {"currency": "USD"}) == 1000
    assert get("meshbank_idempotent_replays_total", {"method": "CreateTransfer"}) == 1
    assert get("meshbank_idempotent_replays_total", {"method": "CreateAccount"}) == 1


def test_metrics_address_is_validated() -> None:
    env = {"MESHBANK_DATABASE_URL": "postgresql+psycopg://u@h/db"}
    assert config_mod.load(env).metrics_address is None
    ok = config_mod.load({**env, "MESHBANK_METRICS_ADDRESS": "127.0.0.1:9100"})
    assert ok.metrics_address == "127.0.0.1:9100"
    with pytest.raises(config_mod.ConfigError, match="MESHBANK_METRICS_ADDRESS='9100'"):
        config_mod.load({**env, "MESHBANK_METRICS_ADDRESS": "9100"})
