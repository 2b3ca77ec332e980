"""A real PostgreSQL (Debian's binaries) and the three services on port 0, per test session."""

from __future__ import annotations

import itertools
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from sqlalchemy.engine import Engine

from meshbank.account.v1 import account_pb2, account_pb2_grpc
from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from meshbank.transfer.v1 import transfer_pb2_grpc
from regions import migrate
from regions.postgres import PostgresError, PostgresNode
from services import app
from services.auth.handlers import AuthService
from services.common.config import ServiceConfig
from services.common.db import make_engine
from services.common.principal import ALL_SCOPES
from services.common.server import run_server
from tests.support import free_port

KEY_PASSPHRASE = "integration-test-passphrase-" + secrets.token_hex(8)


@pytest.fixture(scope="session")
def pg_node() -> Iterator[PostgresNode]:
    base = Path(tempfile.mkdtemp(prefix="meshbank-it-"))
    base.chmod(0o755)  # the postgres user must reach its data directory
    node = None
    try:
        for _ in range(5):
            node = PostgresNode(base / "pg", free_port(), secrets.token_urlsafe(16), durable=False)
            node.init()
            try:
                node.start()
                break
            except PostgresError:
                node.stop()  # most likely the port was taken meanwhile: try another
        else:
            raise PostgresError("could not start PostgreSQL on a free port")
        yield node
    finally:
        if node is not None:
            node.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="session")
def database_url(pg_node: PostgresNode) -> str:
    pg_node.create_database("meshbank")
    url = pg_node.url("meshbank")
    migrate.upgrade(url)
    return url


@pytest.fixture(scope="session")
def engine(database_url: str) -> Iterator[Engine]:
    eng = make_engine(database_url, pool_size=4, application_name="tests")
    yield eng
    eng.dispose()


def service_config(database_url: str) -> ServiceConfig:
    return ServiceConfig(
        database_url=database_url,
        # The primary doubles as the "replica" here: bounded-staleness reads take the
        # replica path and report a staleness of 0.
        read_database_url=database_url,
        listen_address="127.0.0.1:0",
        token_issuer="meshbank-auth",
        token_audience="meshbank-api",
        key_passphrase=KEY_PASSPHRASE,
        db_pool_size=10,
        grpc_workers=16,
        shutdown_grace_seconds=1,
        instance_id="it",
    )


@dataclass(frozen=True)
class Caller:
    """An authenticated principal and the metadata that carries its token."""

    name: str
    token: str

    @property
    def md(self) -> tuple[tuple[str, str]]:
        return (("authorization", f"Bearer {self.token}"),)


class Stack:
    """The running services plus helpers to create principals and funded accounts."""

    _n = itertools.count()

    def __init__(self, channel: grpc.Channel, port: int, admin: AuthService) -> None:
        self.channel = channel
        self.port = port
        self.admin = admin
        self.accounts = account_pb2_grpc.AccountServiceStub(channel)
        self.transfers = transfer_pb2_grpc.TransferServiceStub(channel)
        self.auth = auth_pb2_grpc.AuthServiceStub(channel)
        self._bank: tuple[Caller, str] | None = None

    def unique(self, prefix: str) -> str:
        return f"{prefix}{os.getpid()}x{next(self._n)}"

    def user(self, password: str = "correct horse battery") -> Caller:  # noqa: S107
        username = self.unique("user")
        self.admin.create_user(username, password)
        reply = self.auth.Login(auth_pb2.LoginRequest(username=username, password=password))
        return Caller(f"users/{username}", reply.access_token)

    def partner(self, scopes: frozenset[str] = ALL_SCOPES) -> tuple[Caller, str, str]:
        client_id, secret = self.admin.create_partner(self.unique("partner"), sorted(scopes))
        reply = self.auth.IssueClientToken(
            auth_pb2.IssueClientTokenRequest(client_id=client_id, client_secret=secret)
        )
        return Caller(f"partners/{client_id}", reply.access_token), client_id, secret

    def open(self, who: Caller, currency: str = "USD", **kw: object) -> str:
        reply = self.accounts.CreateAccount(
            account_pb2.CreateAccountRequest(
                request_id=self.unique("open-"),
                currency_code=currency,
                display_name="t",
                **kw,  # type: ignore[arg-type]
            ),
            metadata=who.md,
        )
        return reply.account.account_id

    def bank(self) -> tuple[Caller, str]:
        """A partner owning a USD treasury account allowed to go 10^15 minor units negative."""
        if self._bank is None:
            caller, _, _ = self.partner()
            self._bank = (caller, self.open(caller, overdraft_limit_minor=10**15))
        return self._bank

    def fund(self, account_id: str, amount: int) -> None:
        from meshbank.transfer.v1 import transfer_pb2

        caller, treasury = self.bank()
        self.transfers.CreateTransfer(
            transfer_pb2.CreateTransferRequest(
                request_id=self.unique("fund-"),
                source_account_id=treasury,
                destination_account_id=account_id,
                amount_minor=amount,
                currency_code="USD",
            ),
            metadata=caller.md,
        )

    def balance(self, who: Caller, account_id: str) -> int:
        reply = self.accounts.GetAccount(
            account_pb2.GetAccountRequest(account_id=account_id), metadata=who.md
        )
        return reply.account.balance_minor


@pytest.fixture(scope="session")
def stack(database_url: str) -> Iterator[Stack]:
    built = app.build(service_config(database_url), {"auth", "account", "transfer"})
    assert built.registrations
    admin = app.auth_admin(database_url)
    try:
        with (
            run_server(built.registrations, "127.0.0.1:0", workers=32, grace=1) as running,
            grpc.insecure_channel(f"127.0.0.1:{running.port}") as channel,
        ):
            yield Stack(channel, running.port, admin)
    finally:
        built.engine.dispose()
