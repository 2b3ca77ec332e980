"""The bank check's clients: transfers and snapshot reads through the global entry,
over gRPC (the generated stubs) and REST (JSON through the edges' transcoder).

Each transfer has its own request_id; on a retryable status it is re-sent with the
SAME request_id (bounded, with backoff: regions.workload.retry_same_request) and its
outcome classified by regions.bank_checker.classify. Every attempt's status is kept,
so a definite refusal after a timeout can be told from an unknown outcome.

A snapshot read is one ListAccounts call with page_size >= the number of accounts:
the check's partner owns exactly its accounts, and ListAccounts answers from the
primary in a single SELECT, which PostgreSQL evaluates against one snapshot. N
GetAccount calls would not be a snapshot (a transfer can commit between two of them),
and "every read sums to the total" would fail for the wrong reason.
"""

from __future__ import annotations

import http.client
import itertools
import json
import random
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import grpc
from google.rpc import code_pb2

from meshbank.account.v1 import account_pb2, account_pb2_grpc
from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from meshbank.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from regions import public_client
from regions.bank_checker import ReadOp, TransferOp, classify
from regions.workload import RETRYABLE, retry_same_request

# HTTP statuses a proxy answers when the request may not have reached (or finished at)
# the service; "CONNECTION" is a refused/reset/timed-out connection.
RETRYABLE_HTTP = frozenset({"HTTP 429", "HTTP 502", "HTTP 503", "HTTP 504", "CONNECTION"})
RETRYABLE_STATUSES = frozenset({c.name for c in RETRYABLE}) | RETRYABLE_HTTP
CURRENCY = "USD"


class Transport(Protocol):
    """One client's connection to the global entry in one protocol."""

    protocol: str

    def transfer(self, token: str, request: transfer_pb2.CreateTransferRequest) -> str:
        """Send the transfer once; the status name (``OK``, ``UNAVAILABLE``, ``HTTP 503``)."""
        ...

    def balances(self, token: str, page_size: int) -> tuple[str, dict[str, int] | None]:
        """One ListAccounts page: (status, account_id -> balance when OK)."""
        ...

    def close(self) -> None: ...


def _md(token: str) -> tuple[tuple[str, str]]:
    return (("authorization", f"Bearer {token}"),)


@dataclass
class GrpcTransport:
    address: str
    ca_file: Path
    timeout: float = 5.0
    protocol: str = "grpc"

    def __post_init__(self) -> None:
        self._channel = public_client.grpc_channel(self.address, self.ca_file)
        self._transfers = transfer_pb2_grpc.TransferServiceStub(self._channel)
        self._accounts = account_pb2_grpc.AccountServiceStub(self._channel)

    def transfer(self, token: str, request: transfer_pb2.CreateTransferRequest) -> str:
        try:
            self._transfers.CreateTransfer(request, metadata=_md(token), timeout=self.timeout)
        except grpc.RpcError as err:
            return str(err.code().name)
        return "OK"

    def balances(self, token: str, page_size: int) -> tuple[str, dict[str, int] | None]:
        try:
            reply = self._accounts.ListAccounts(
                account_pb2.ListAccountsRequest(page_size=page_size),
                metadata=_md(token),
                timeout=self.timeout,
            )
        except grpc.RpcError as err:
            return str(err.code().name), None
        if reply.next_page_token:
            return "MORE_THAN_ONE_PAGE", None
        return "OK", {a.account_id: int(a.balance_minor) for a in reply.accounts}

    def close(self) -> None:
        self._channel.close()


def rest_status(http_status: int, body: bytes) -> str:
    """The gRPC code name the transcoder put in a JSON ``google.rpc.Status`` body, else
    ``HTTP <status>`` (a proxy's own answer, e.g. 503 "no healthy upstream")."""
    if http_status == 200:
        return "OK"
    try:
        code = json.loads(body).get("code")
    except (ValueError, AttributeError):
        code = None
    if isinstance(code, int) and code in code_pb2.Code.values():
        return str(code_pb2.Code.Name(code))
    return f"HTTP {http_status}"


@dataclass
class RestTransport:
    address: str
    ca_file: Path
    timeout: float = 5.0
    protocol: str = "rest"
    _conn: http.client.HTTPSConnection | None = field(default=None, init=False)

    def _call(self, method: str, path: str, token: str, body: bytes | None) -> tuple[int, bytes]:
        if self._conn is None:
            host, port = self.address.rsplit(":", 1)
            self._conn = http.client.HTTPSConnection(
                host,
                int(port),
                timeout=self.timeout,
                context=public_client.ssl_context(self.ca_file),
            )
        headers = {"authorization": f"Bearer {token}", "content-type": "application/json"}
        try:
            self._conn.request(method, path, body=body, headers=headers)
            reply = self._conn.getresponse()
            return reply.status, reply.read()
        except (OSError, http.client.HTTPException):
            # Reconnect next time: the proxy may have closed a kept-alive connection.
            self.close()
            return 0, b""

    def transfer(self, token: str, request: transfer_pb2.CreateTransferRequest) -> str:
        body = {
            "request_id": request.request_id,
            "source_account_id": request.source_account_id,
            "destination_account_id": request.destination_account_id,
            "amount_minor": str(request.amount_minor),  # int64 is a JSON string
            "currency_code": request.currency_code,
        }
        status, reply = self._call("POST", "/v1/transfers", token, json.dumps(body).encode())
        return "CONNECTION" if status == 0 else rest_status(status, reply)

    def balances(self, token: str, page_size: int) -> tuple[str, dict[str, int] | None]:
        status, reply = self._call("GET", f"/v1/accounts?page_size={page_size}", token, None)
        if status != 200:
            return ("CONNECTION" if status == 0 else rest_status(status, reply)), None
        data: dict[str, Any] = json.loads(reply)
        if data.get("nextPageToken"):
            return "MORE_THAN_ONE_PAGE", None
        return "OK", {a["accountId"]: int(a["balanceMinor"]) for a in data.get("accounts", [])}

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def transport(protocol: str, address: str, ca_file: Path) -> Transport:
    if protocol == "grpc":
        return GrpcTransport(address, ca_file)
    if protocol == "rest":
        return RestTransport(address, ca_file)
    raise ValueError(f"unknown protocol {protocol!r}")


class TokenSource:
    """A partner's access token, re-issued well before it expires (tokens last 15 min;
    a long check outlives several). A failed refresh keeps the current token."""

    def __init__(
        self,
        address: str,
        ca_file: Path,
        client_id: str,
        client_secret: str,
        refresh_after: float = 300.0,
    ) -> None:
        self._address = address
        self._ca_file = ca_file
        self._client_id = client_id
        self._client_secret = client_secret
        self._refresh_after = refresh_after
        self._lock = threading.Lock()
        self._token = ""
        self._issued = 0.0

    def _issue(self) -> str:
        with public_client.grpc_channel(self._address, self._ca_file) as channel:
            reply = auth_pb2_grpc.AuthServiceStub(channel).IssueClientToken(
                auth_pb2.IssueClientTokenRequest(
                    client_id=self._client_id, client_secret=self._client_secret
                ),
                timeout=10,
            )
        return str(reply.access_token)

    def get(self) -> str:
        with self._lock:
            if not self._token or time.monotonic() - self._issued > self._refresh_after:
                try:
                    self._token = self._issue()
                    self._issued = time.monotonic()
                except grpc.RpcError:
                    if not self._token:
                        raise
            return self._token


@dataclass
class BankClients:
    """``clients`` transfer loops (even ones gRPC, odd ones REST), each on the global
    entry's listener for a client location in turn, plus one snapshot reader."""

    addresses: Sequence[str]  # the global entry, one listener per client location
    tokens: TokenSource
    principal: str
    accounts: Sequence[str]
    ca_file: Path  # verifies the global entry (regions/public_client.py)
    clients: int = 4
    max_amount: int = 2_500
    seed: int = 0
    pause: float = 0.01
    read_interval: float = 0.5
    retry_window: float = 20.0
    max_attempts: int = 12
    t0: float = field(default_factory=time.monotonic)
    transfers: list[TransferOp] = field(default_factory=list)
    reads: list[ReadOp] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        for n in range(self.clients):
            protocol = "grpc" if n % 2 == 0 else "rest"
            address = self.addresses[n % len(self.addresses)]
            self._spawn(self._transfer_loop, n, protocol, address)
        self._spawn(self._read_loop, self.clients, "", self.addresses[0])

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(self.retry_window + 30)

    def _spawn(self, target: Callable[[int, str, str], None], *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True, name=f"bank-{args[0]}")
        thread.start()
        self._threads.append(thread)

    def _now(self) -> float:
        return time.monotonic() - self.t0

    def _transfer_loop(self, n: int, protocol: str, address: str) -> None:
        rng = random.Random(self.seed * 1000 + n)  # noqa: S311 - load shape, not security
        conn = transport(protocol, address, self.ca_file)
        try:
            while not self._stop.is_set():
                source, destination = rng.sample(list(self.accounts), 2)
                self._transfer(conn, source, destination, rng.randint(1, self.max_amount))
                time.sleep(self.pause)
        finally:
            conn.close()

    def _transfer(self, conn: Transport, source: str, destination: str, amount: int) -> None:
        request = transfer_pb2.CreateTransferRequest(
            request_id=f"bank-{uuid.uuid4()}",
            source_account_id=source,
            destination_account_id=destination,
            amount_minor=amount,
            currency_code=CURRENCY,
        )
        started = self._now()
        statuses = retry_same_request(
            lambda: conn.transfer(self.tokens.get(), request),
            lambda s: s in RETRYABLE_STATUSES,
            window=self.retry_window,
            max_attempts=self.max_attempts,
            max_delay=1.0,
        )
        op = TransferOp(
            request_id=request.request_id,
            principal=self.principal,
            source=source,
            destination=destination,
            amount=amount,
            protocol=conn.protocol,
            started=started,
            finished=self._now(),
            outcome=classify(statuses, RETRYABLE_STATUSES),
            status=statuses[-1],
            attempts=len(statuses),
        )
        with self._lock:
            self.transfers.append(op)

    def _read_loop(self, _n: int, _protocol: str, address: str) -> None:
        conns = [transport("grpc", address, self.ca_file), transport("rest", address, self.ca_file)]
        try:
            for turn in itertools.count():
                if self._stop.wait(self.read_interval):
                    return
                conn = conns[turn % 2]
                started = self._now()
                status, balances = conn.balances(self.tokens.get(), len(self.accounts))
                with self._lock:
                    self.reads.append(ReadOp(conn.protocol, started, self._now(), status, balances))
        finally:
            for conn in conns:
                conn.close()
