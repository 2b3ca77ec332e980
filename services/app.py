"""Composition root: builds the servicers of one process from its configuration.

Nothing here connects at import time; the engine connects lazily on the first call.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from sqlalchemy.engine import Engine

from meshbank.account.v1 import account_pb2, account_pb2_grpc
from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from meshbank.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from regions.topology import load as load_topology
from services.account.servicer import AccountServicer
from services.auth import sql as auth_sql
from services.auth.handlers import AuthService
from services.auth.passwords import Passwords
from services.auth.servicer import AuthServicer
from services.auth.tokens import CachingKeySource, TokenIssuer, TokenVerifier
from services.common.config import ServiceConfig
from services.common.db import RetryPolicy, make_engine
from services.common.metrics import ServiceMetrics
from services.common.server import Registration
from services.ledger import sql as ledger_sql
from services.ledger.handlers import LedgerService
from services.transfer.servicer import TransferServicer

ACCOUNT_SERVICE = account_pb2.DESCRIPTOR.services_by_name["AccountService"].full_name
TRANSFER_SERVICE = transfer_pb2.DESCRIPTOR.services_by_name["TransferService"].full_name
AUTH_SERVICE = auth_pb2.DESCRIPTOR.services_by_name["AuthService"].full_name
API_SERVICES = (AUTH_SERVICE, ACCOUNT_SERVICE, TRANSFER_SERVICE)


# A replica read that fails is tried again, quickly, twice more before it falls back to
# the primary. When the region's own member dies, the first attempt meets the broken
# pooled connection and the next two are refused by the sidecar; those two refusals are
# what its outlier detection ejects the member on (consecutive_gateway_failure 2), so the
# fourth reaches the next region's replica. With two attempts the read fell back to the
# primary instead, which in the leader's region is the same dead member, and waited 2 s
# there (db-leader-kill, docs/benchmarks.md). The worst case adds about 50 ms.
REPLICA_POLICY = RetryPolicy(max_attempts=4, base_delay=0.005, max_delay=0.02)


@dataclass(frozen=True)
class Built:
    """The registrations to serve and the resources to close at shutdown."""

    registrations: list[Registration]
    engine: Engine
    metrics: ServiceMetrics


def build_with_engine(
    config: ServiceConfig,
    services: Iterable[str],
    engine: Engine,
    read_engine: Engine | None = None,
    metrics: ServiceMetrics | None = None,
) -> Built:
    metrics = metrics or ServiceMetrics()
    wanted = set(services)
    unknown = wanted - {"account", "transfer", "auth"}
    if unknown:
        raise ValueError(f"unknown services: {sorted(unknown)}")
    verifier = TokenVerifier(
        config.token_issuer,
        config.token_audience,
        CachingKeySource(lambda: auth_sql.load_public_keys(engine)),
    )
    ledger = LedgerService(
        ledger_sql.transaction_runner(engine, on_retry=metrics.observe_retry),
        # A replica that keeps failing is skipped (the read falls back to the primary).
        read_replica=ledger_sql.transaction_runner(read_engine, policy=REPLICA_POLICY)
        if read_engine is not None
        else None,
        # Accounts opened here live in this region; unset, the topology's default.
        region=config.region or load_topology().default_location,
        events=metrics,
    )
    registrations: list[Registration] = []
    if "auth" in wanted:
        auth = AuthService(
            auth_sql.transaction_runner(engine, on_retry=metrics.observe_retry),
            TokenIssuer(config.token_issuer, config.token_audience),
            Passwords(),
            key_passphrase=config.key_passphrase,
            read_replica=auth_sql.transaction_runner(read_engine, policy=REPLICA_POLICY)
            if read_engine is not None
            else None,
        )
        # Every replica signs with the newest key in the database; the first one up
        # creates it. The passphrase that encrypts it never leaves this process.
        auth.ensure_signing_key()
        registrations.append(
            Registration(
                AUTH_SERVICE, AuthServicer(auth), auth_pb2_grpc.add_AuthServiceServicer_to_server
            )
        )
    if "account" in wanted:
        registrations.append(
            Registration(
                ACCOUNT_SERVICE,
                AccountServicer(ledger, verifier),
                account_pb2_grpc.add_AccountServiceServicer_to_server,
            )
        )
    if "transfer" in wanted:
        registrations.append(
            Registration(
                TRANSFER_SERVICE,
                TransferServicer(ledger, verifier),
                transfer_pb2_grpc.add_TransferServiceServicer_to_server,
            )
        )
    return Built(registrations, engine, metrics)


def build(config: ServiceConfig, services: Iterable[str]) -> Built:
    engine = make_engine(
        config.database_url,
        pool_size=config.db_pool_size,
        application_name=f"meshbank-{'-'.join(sorted(services))}",
    )
    read_engine = None
    if config.read_database_url:
        read_engine = make_engine(
            config.read_database_url,
            pool_size=config.db_pool_size,
            application_name=f"meshbank-{'-'.join(sorted(services))}-reads",
            isolation_level="REPEATABLE READ",
        )
    return build_with_engine(config, services, engine, read_engine)


def auth_admin(database_url: str) -> AuthService:
    """The auth use cases for operator commands (users create, partners create, rotate-keys)."""
    engine = make_engine(database_url, pool_size=1, application_name="meshbank-admin")
    return AuthService(
        auth_sql.transaction_runner(engine),
        TokenIssuer("unused", "unused"),
        Passwords(),
    )
