"""A bounded client workload against the global entry: transfers and reads, every outcome kept.

Used by the failover drills (the bank check and the bench share its retry helpers). Writers move
random amounts between a fixed set of accounts, each transfer with its own request_id;
a write that fails with a retryable status is re-sent with the same request_id until
``retry_window`` runs out, as a careful client would. Readers read balances with bounded staleness
from the nearest replica. Nothing here asserts anything: the caller checks the ledger.
"""

from __future__ import annotations

import itertools
import random
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import grpc

from meshbank.account.v1 import account_pb2, account_pb2_grpc
from meshbank.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from regions import public_client

RETRYABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.ABORTED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    }
)


@dataclass(frozen=True)
class Write:
    request_id: str
    source: str
    destination: str
    amount: int
    started: float
    finished: float
    code: grpc.StatusCode
    attempts: int

    @property
    def ok(self) -> bool:
        return self.code == grpc.StatusCode.OK


@dataclass(frozen=True)
class Read:
    started: float
    finished: float
    code: grpc.StatusCode
    served_by: str


@dataclass
class Workload:
    address: str
    token: str
    accounts: list[str]
    ca_file: Path  # verifies the global entry (regions/public_client.py)
    writers: int = 3
    readers: int = 2
    retry_window: float = 30.0
    pause: float = 0.02
    writes: list[Write] = field(default_factory=list)
    reads: list[Read] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for n in range(self.writers):
            self._spawn(self._write_loop, n)
        for n in range(self.readers):
            self._spawn(self._read_loop, n)

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.retry_window + 30)

    def _spawn(self, target: Callable[[int], None], n: int) -> None:
        thread = threading.Thread(target=target, args=(n,), daemon=True)
        thread.start()
        self._threads.append(thread)

    @property
    def _metadata(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.token}"),)

    def _write_loop(self, n: int) -> None:
        rng = random.Random(n)  # noqa: S311 - load shape, not security
        with public_client.grpc_channel(self.address, self.ca_file) as channel:
            stub = transfer_pb2_grpc.TransferServiceStub(channel)
            while not self._stop.is_set():
                source, destination = rng.sample(self.accounts, 2)
                self._transfer(stub, source, destination, rng.randint(1, 100))
                time.sleep(self.pause)

    def _transfer(
        self,
        stub: transfer_pb2_grpc.TransferServiceStub,
        source: str,
        destination: str,
        amount: int,
    ) -> None:
        request = transfer_pb2.CreateTransferRequest(
            request_id=f"wl-{uuid.uuid4()}",
            source_account_id=source,
            destination_account_id=destination,
            amount_minor=amount,
            currency_code="USD",
        )
        started = time.monotonic()

        def attempt() -> grpc.StatusCode:
            try:
                stub.CreateTransfer(request, metadata=self._metadata, timeout=10)
            except grpc.RpcError as err:
                return err.code()
            return grpc.StatusCode.OK

        codes = retry_same_request(attempt, lambda c: c in RETRYABLE, window=self.retry_window)
        code, attempts = codes[-1], len(codes)
        write = Write(
            request.request_id,
            source,
            destination,
            amount,
            started,
            time.monotonic(),
            code,
            attempts,
        )
        with self._lock:
            self.writes.append(write)

    def _read_loop(self, n: int) -> None:
        rng = random.Random(1000 + n)  # noqa: S311
        with public_client.grpc_channel(self.address, self.ca_file) as channel:
            stub = account_pb2_grpc.AccountServiceStub(channel)
            while not self._stop.is_set():
                started = time.monotonic()
                served_by = ""
                try:
                    _, call = stub.GetAccount.with_call(
                        account_pb2.GetAccountRequest(
                            account_id=rng.choice(self.accounts),
                            consistency=account_pb2.READ_CONSISTENCY_BOUNDED_STALENESS,
                        ),
                        metadata=self._metadata,
                        timeout=5,
                    )
                    code = grpc.StatusCode.OK
                    served_by = str(dict(call.initial_metadata()).get("x-meshbank-served-by", ""))
                except grpc.RpcError as err:
                    code = err.code()
                with self._lock:
                    self.reads.append(Read(started, time.monotonic(), code, served_by))
                time.sleep(self.pause)


ResultT = TypeVar("ResultT")


def retry_same_request(
    attempt: Callable[[], ResultT],
    retryable: Callable[[ResultT], bool],
    *,
    window: float,
    max_attempts: int | None = None,
    first_delay: float = 0.05,
    max_delay: float = 0.5,
    sleep: Callable[[float], None] = time.sleep,
) -> list[ResultT]:
    """Call ``attempt`` (which re-sends one request with the SAME request_id) until its
    result is not retryable, ``window`` seconds have passed or ``max_attempts`` ran out;
    exponential backoff in between. Returns every attempt's result, the last one last:
    a caller needs the whole list to tell "failed" from "unknown" (an earlier attempt
    may have been applied although a later one timed out).
    """
    started = time.monotonic()
    results: list[ResultT] = []
    delay = first_delay
    while True:
        results.append(attempt())
        if not retryable(results[-1]):
            return results
        if time.monotonic() - started >= window:
            return results
        if max_attempts is not None and len(results) >= max_attempts:
            return results
        sleep(delay)
        delay = min(max_delay, delay * 2)


def call_retrying(call: Callable[[], ResultT], *, window: float, max_delay: float = 0.5) -> ResultT:
    """``call``'s result, the call re-sent on retryable gRPC statuses for up to ``window``
    seconds (``retry_same_request``); the last error is raised. Only for calls that are
    safe to repeat: a fixed request_id (a replay, not a repeat) or a read."""

    def attempt() -> tuple[ResultT | None, grpc.RpcError | None]:
        try:
            return call(), None
        except grpc.RpcError as err:
            return None, err

    results = retry_same_request(
        attempt,
        lambda r: r[1] is not None and r[1].code() in RETRYABLE,
        window=window,
        max_delay=max_delay,
    )
    value, err = results[-1]
    if err is not None:
        raise err
    return value  # type: ignore[return-value]  # None only with an error


def outage_after(fault_at: float, events: list[tuple[float, float, bool]]) -> float:
    """Seconds from the fault to the first success of an operation started after it."""
    after = [finished for started, finished, ok in events if ok and started >= fault_at]
    return max(0.0, min(after) - fault_at) if after else float("inf")


def longest_gap(start: float, end: float, events: list[tuple[float, float, bool]]) -> float:
    """The longest time in [start, end] without a successful completion."""
    times = sorted(finished for _, finished, ok in events if ok and start <= finished <= end)
    points = [start, *times, end]
    return max(b - a for a, b in itertools.pairwise(points)) if len(points) > 1 else 0.0
