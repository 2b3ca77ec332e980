"""A bounded, steady client load through the global entry, recording every outcome."""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from meshbank.account.v1 import account_pb2, account_pb2_grpc
from meshbank.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from regions import public_client

RETRYABLE = {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED}


@dataclass
class Outcome:
    """One call's final outcome; ``sent`` is when its (last) attempt was sent, ``at`` when
    it completed. Routing is judged by ``sent``: on a loaded machine a call sent before a
    kill can complete seconds after it, served by the region that was then healthy."""

    sent: float
    at: float
    kind: str  # read | write
    code: grpc.StatusCode
    served_by: str
    request_id: str = ""


@dataclass
class Load:
    """Reads (GetAccount) and transfers (1 minor unit, unique request_id) in a loop.

    A write that fails with a retryable status is retried with the same request_id up to
    ``write_attempts`` times, as a real client would; the final outcome is recorded.
    """

    address: str
    ca_file: Path
    token: str
    source: str
    destination: str
    threads: int = 4
    pause: float = 0.01
    write_attempts: int = 4
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _workers: list[threading.Thread] = field(default_factory=list)
    _ids: itertools.count[int] = field(default_factory=itertools.count)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __enter__(self) -> Load:
        self.started = time.monotonic()
        for n in range(self.threads):
            worker = threading.Thread(target=self._run, args=(n,), daemon=True)
            worker.start()
            self._workers.append(worker)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for worker in self._workers:
            worker.join(60)

    def _record(self, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)

    def _run(self, n: int) -> None:
        md = (("authorization", f"Bearer {self.token}"),)
        with public_client.grpc_channel(self.address, self.ca_file) as channel:
            accounts = account_pb2_grpc.AccountServiceStub(channel)
            transfers = transfer_pb2_grpc.TransferServiceStub(channel)
            while not self._stop.is_set():
                if n % 2 == 0:
                    self._read(accounts, md)
                else:
                    self._write(transfers, md)
                time.sleep(self.pause)

    @staticmethod
    def _served_by(call: grpc.Call) -> str:
        for key, value in call.initial_metadata() or ():
            if key == "x-meshbank-served-by":
                return str(value)
        return ""

    def _read(
        self, accounts: account_pb2_grpc.AccountServiceStub, md: tuple[tuple[str, str]]
    ) -> None:
        sent = time.monotonic()
        try:
            _, call = accounts.GetAccount.with_call(
                account_pb2.GetAccountRequest(account_id=self.source), metadata=md, timeout=10
            )
            self._record(
                Outcome(sent, time.monotonic(), "read", grpc.StatusCode.OK, self._served_by(call))
            )
        except grpc.RpcError as err:
            self._record(Outcome(sent, time.monotonic(), "read", err.code(), ""))

    def _write(
        self, transfers: transfer_pb2_grpc.TransferServiceStub, md: tuple[tuple[str, str]]
    ) -> None:
        request_id = f"load-{self.started}-{next(self._ids)}"
        request = transfer_pb2.CreateTransferRequest(
            request_id=request_id,
            source_account_id=self.source,
            destination_account_id=self.destination,
            amount_minor=1,
            currency_code="USD",
        )
        code = grpc.StatusCode.UNKNOWN
        sent = time.monotonic()
        for _ in range(self.write_attempts):
            sent = time.monotonic()
            try:
                _, call = transfers.CreateTransfer.with_call(request, metadata=md, timeout=20)
                self._record(
                    Outcome(
                        sent,
                        time.monotonic(),
                        "write",
                        grpc.StatusCode.OK,
                        self._served_by(call),
                        request_id,
                    )
                )
                return
            except grpc.RpcError as err:
                code = err.code()
                if code not in RETRYABLE:
                    break
                time.sleep(0.2)
        self._record(Outcome(sent, time.monotonic(), "write", code, "", request_id))

    def failed(self, kind: str) -> list[Outcome]:
        return [o for o in self.outcomes if o.kind == kind and o.code != grpc.StatusCode.OK]

    def regions_between(self, start: float, end: float) -> set[str]:
        """The regions that served the calls sent between ``start`` and ``end``."""
        return {
            o.served_by.split("/")[0]
            for o in self.outcomes
            if start <= o.sent <= end and o.served_by
        }
