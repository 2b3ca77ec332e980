"""Database engine and the one whole-transaction retry helper.

Why a helper of our own (DESIGN.md, "Data layer"): ``sqlalchemy_cockroachdb.run_transaction``
retries inside one transaction through a savepoint, which fails on PostgreSQL
SERIALIZABLE, and retries forever without backoff. This helper instead re-runs the
*whole* transaction (a new BEGIN on a fresh pooled connection) on serialization
failures (40001), deadlocks (40P01), a read-only standby after a failover (25006, or
0A000 for SERIALIZABLE on a hot standby) and lost connections, a bounded number of
times with exponential backoff and full jitter.
It is right for both PostgreSQL and CockroachDB, whose retry error is also 40001.

Two rules keep acknowledged writes safe:

* A COMMIT is never cancelled: no statement_timeout is set on our sessions (a timeout
  that fires while COMMIT waits for the synchronous standby makes PostgreSQL return
  success with the warning "canceling wait for synchronous replication ... committed
  locally", and such writes were lost at failover).
* That warning, if it ever appears, is treated as a failure of the transaction. The
  caller retries with the same request_id, and the idempotency record written in the
  same transaction makes the retry apply the effect at most once.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from services.common import errors, telemetry

log = logging.getLogger(__name__)

T = TypeVar("T")
U = TypeVar("U")

RETRYABLE_SQLSTATES = frozenset(
    {
        "40001",  # serialization_failure (also CockroachDB's retry error)
        "40P01",  # deadlock_detected
        "25006",  # read_only_sql_transaction: we reached a standby during a failover
        "57P01",  # admin_shutdown
        "57P02",  # crash_shutdown
        "57P03",  # cannot_connect_now (starting up / in recovery)
        "53300",  # too_many_connections
    }
)
# A unique violation on the idempotency key means a concurrent twin of this request
# committed first: re-running the transaction replays its stored response.
RETRYABLE_UNIQUE_CONSTRAINTS = frozenset({"pk_idempotency_keys"})
SYNC_REP_CANCELLED = "canceling wait for synchronous replication"


class AmbiguousCommitError(Exception):
    """The server committed only locally: the write may not survive a failover."""


@dataclass(frozen=True)
class RetryPolicy:
    """Bounds of the retry loop: attempts, and the backoff's base and cap in seconds.

    The defaults ride out a database leader failover (about 6-7 s here): 20 attempts
    with full-jitter backoff capped at 0.5 s take about 4 s on average, at most ~8 s.
    """

    max_attempts: int = 20
    base_delay: float = 0.01
    max_delay: float = 0.5

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter exponential backoff (AWS architecture blog) for attempt >= 1."""
        return rng.uniform(0, min(self.max_delay, self.base_delay * 2 ** (attempt - 1)))


def make_engine(
    url: str,
    *,
    pool_size: int = 10,
    application_name: str = "meshbank",
    isolation_level: str = "SERIALIZABLE",
) -> Engine:
    """Create the engine; connects lazily (nothing connects at import or construction).

    Replicas take REPEATABLE READ: a hot standby refuses SERIALIZABLE, and a read-only
    snapshot of one account needs nothing stronger.
    """
    engine = sa.create_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No pre-ping round trip per checkout: a dead pooled connection fails the
        # transaction, and run_transaction re-runs it on a fresh one.
        pool_pre_ping=False,
        isolation_level=isolation_level,
        connect_args={"application_name": application_name},
    )
    if engine.dialect.driver == "psycopg":
        event.listen(engine, "connect", _record_notices)
    telemetry.instrument_engine(engine)  # a span per statement and COMMIT
    return engine


def _record_notices(dbapi_connection: Any, connection_record: Any) -> None:
    notices: list[str] = connection_record.info.setdefault("notices", [])

    def on_notice(diag: Any) -> None:
        notices.append(str(diag.message_primary or ""))

    dbapi_connection.add_notice_handler(on_notice)


def is_retryable(exc: BaseException) -> bool:
    """True when re-running the whole transaction may succeed."""
    if isinstance(exc, AmbiguousCommitError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    if exc.connection_invalidated:
        return True
    sqlstate = getattr(exc.orig, "sqlstate", None)
    if sqlstate is None:
        # psycopg reports a dropped connection as OperationalError without a SQLSTATE.
        return isinstance(exc, sa.exc.OperationalError)
    if sqlstate == "0A000":
        # "cannot use serializable mode in a hot standby": the write path reached a
        # member that was just demoted (a partitioned old leader) before the sidecar's
        # health check moved on; like 25006, a new connection finds the primary.
        return "hot standby" in str(exc.orig)
    if sqlstate == "23505":
        diag = getattr(exc.orig, "diag", None)
        return getattr(diag, "constraint_name", None) in RETRYABLE_UNIQUE_CONSTRAINTS
    return sqlstate in RETRYABLE_SQLSTATES or sqlstate.startswith("08")


@dataclass(frozen=True)
class RetryCause:
    """Why a transaction is re-run, for the retry metrics.

    ``sqlstate_class`` is the SQLSTATE's two-character class ("40" serialization or
    deadlock, "25" read-only, "57" shutdown, "08" connection, ...), ``"none"`` for a
    lost connection the driver reports without one, ``"ambiguous_commit"`` for a commit
    that was only local. ``reconnect`` is set when the next attempt needs another
    connection, and usually another server: the signs of a database failover.
    """

    sqlstate_class: str
    reconnect: str | None


# SQLSTATEs that mean the server went away or is not the primary any more.
_FAILOVER_SQLSTATES = {
    "25006": "read_only_standby",
    "57P01": "server_shutdown",
    "57P02": "server_shutdown",
    "57P03": "server_starting",
}


def retry_cause(exc: BaseException) -> RetryCause:
    """Classify a retryable error (see ``is_retryable``) for counting."""
    if isinstance(exc, AmbiguousCommitError):
        return RetryCause("ambiguous_commit", None)
    sqlstate = getattr(getattr(exc, "orig", None), "sqlstate", None)
    invalidated = isinstance(exc, DBAPIError) and exc.connection_invalidated
    if sqlstate is None:
        return RetryCause("none", "connection_lost")
    if invalidated or sqlstate.startswith("08"):
        return RetryCause(sqlstate[:2], "connection_lost")
    return RetryCause(sqlstate[:2], _FAILOVER_SQLSTATES.get(sqlstate))


DEFAULT_POLICY = RetryPolicy()
# One generator for the backoff jitter: seeding one per transaction (from os.urandom) was
# 1.4% of the transfer service's wall time under load.
_JITTER = random.Random()  # noqa: S311 - jitter, not security

# Called once per retry with the attempt number and the error; services count them.
RetryObserver = Callable[[int, BaseException], None]


def run_transaction(
    engine: Engine,
    work: Callable[[Connection], T],
    *,
    policy: RetryPolicy = DEFAULT_POLICY,
    readonly: bool = False,
    on_retry: RetryObserver | None = None,
    rng: random.Random | None = None,
) -> T:
    """Run ``work`` in a SERIALIZABLE transaction, re-running the whole of it when retryable.

    ``work`` must be safe to run more than once: everything it does happens inside the
    transaction (which is rolled back on failure) and domain errors it raises are not
    retried. Exhausted retries raise ``errors.Unavailable``.
    """
    rng = rng or _JITTER
    for attempt in range(1, policy.max_attempts + 1):
        try:
            with engine.connect() as conn:
                if readonly:
                    conn = conn.execution_options(postgresql_readonly=True)
                notices: list[str] = conn.connection.info.setdefault("notices", [])
                notices.clear()
                with conn.begin():
                    result = work(conn)
                if any(SYNC_REP_CANCELLED in n for n in notices):
                    raise AmbiguousCommitError(notices[-1])
                return result
        except Exception as exc:
            if not is_retryable(exc):
                raise
            if on_retry is not None:
                on_retry(attempt, exc)
            if attempt == policy.max_attempts:
                log.warning("transaction failed after %d attempts: %s", attempt, exc)
                raise errors.Unavailable(
                    "the database is unavailable or too contended; retry with the same request_id",
                    reason="DATABASE_UNAVAILABLE",
                ) from exc
            delay = policy.delay(attempt, rng)
            log.info("retrying transaction (attempt %d, in %.3fs): %s", attempt, delay, exc)
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


class UnitOfWorkRunner(Generic[U]):
    """Runs units of work of one kind (``make_uow`` over a connection) with
    ``run_transaction``: what every service's ``TransactionRunner`` port needs."""

    def __init__(
        self,
        engine: Engine,
        make_uow: Callable[[Connection], U],
        *,
        policy: RetryPolicy = DEFAULT_POLICY,
        on_retry: RetryObserver | None = None,
    ) -> None:
        self._engine = engine
        self._make_uow = make_uow
        self._policy = policy
        self._on_retry = on_retry

    def __call__(self, work: Callable[[U], T], *, readonly: bool = False) -> T:
        return run_transaction(
            self._engine,
            lambda conn: work(self._make_uow(conn)),
            policy=self._policy,
            readonly=readonly,
            on_retry=self._on_retry,
        )
