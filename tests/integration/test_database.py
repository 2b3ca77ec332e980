"""The database's own guarantees and the retry helper, against the real PostgreSQL."""

from __future__ import annotations

import threading
import uuid

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import DBAPIError

from services.common import db, errors
from services.common.schema import metadata
from tests.integration.conftest import Stack


def test_migrated_schema_matches_the_code(engine: Engine) -> None:
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def a_transfer(stack: Stack) -> str:
    alice = stack.user()
    a, b = stack.open(alice), stack.open(alice)
    stack.fund(a, 10)
    from tests.integration.test_transfers_api import pay

    return pay(stack, alice, a, b, 5).transfer_id


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_entries SET amount_minor = amount_minor * 2 WHERE transfer_id = :t",
        "DELETE FROM ledger_entries WHERE transfer_id = :t",
        "UPDATE transfers SET amount_minor = 1 WHERE transfer_id = :t",
        "DELETE FROM transfers WHERE transfer_id = :t",
        "TRUNCATE ledger_entries CASCADE",
        "TRUNCATE idempotency_keys",
    ],
)
def test_ledger_is_append_only(stack: Stack, engine: Engine, statement: str) -> None:
    transfer_id = a_transfer(stack)
    with pytest.raises(DBAPIError, match="append-only"), engine.begin() as conn:
        conn.execute(sa.text(statement), {"t": transfer_id})


def test_unbalanced_entries_cannot_commit(stack: Stack, engine: Engine) -> None:
    transfer_id = a_transfer(stack)
    with engine.connect() as conn:
        account_id = conn.execute(
            sa.text("SELECT account_id FROM ledger_entries WHERE transfer_id = :t LIMIT 1"),
            {"t": transfer_id},
        ).scalar()
    with pytest.raises(DBAPIError, match="unbalanced"), engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO ledger_entries VALUES (:e, :t, :a, 7, 'USD', now())"),
            {"e": uuid.uuid4(), "t": transfer_id, "a": account_id},
        )


def test_database_refuses_a_balance_beyond_the_overdraft(stack: Stack, engine: Engine) -> None:
    alice = stack.user()
    a = stack.open(alice)
    with pytest.raises(DBAPIError, match="within_overdraft"), engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE accounts SET balance_minor = -1 WHERE account_id = :a"), {"a": a}
        )


def _scratch_table(engine: Engine) -> None:
    with engine.begin() as conn:
        conn.execute(sa.text("CREATE TABLE IF NOT EXISTS scratch (k int PRIMARY KEY, v int)"))
        conn.execute(
            sa.text("INSERT INTO scratch VALUES (1, 0) ON CONFLICT (k) DO UPDATE SET v = 0")
        )


def test_a_forced_serialization_failure_is_retried_and_succeeds(engine: Engine) -> None:
    _scratch_table(engine)
    attempts: list[int] = []
    retries: list[str] = []

    def work(conn: Connection) -> int:
        attempts.append(1)
        value = conn.execute(sa.text("SELECT v FROM scratch WHERE k = 1")).scalar_one()
        if len(attempts) == 1:
            # A concurrent transaction changes the row we read and commits first...
            with engine.begin() as other:
                other.execute(sa.text("UPDATE scratch SET v = v + 100 WHERE k = 1"))
        # ...so this update fails with SQLSTATE 40001 on the first attempt.
        conn.execute(sa.text("UPDATE scratch SET v = :v WHERE k = 1"), {"v": value + 1})
        return int(value)

    result = db.run_transaction(
        engine,
        work,
        on_retry=lambda _n, exc: retries.append(type(exc.orig).__name__),  # type: ignore[attr-defined]
    )
    assert len(attempts) == 2
    assert retries == ["SerializationFailure"]
    assert result == 100
    with engine.connect() as conn:
        assert conn.execute(sa.text("SELECT v FROM scratch WHERE k = 1")).scalar_one() == 101


def test_retries_are_bounded(engine: Engine) -> None:
    _scratch_table(engine)
    calls = 0

    def always_conflicts(conn: Connection) -> None:
        nonlocal calls
        calls += 1
        conn.execute(sa.text("SELECT v FROM scratch WHERE k = 1")).scalar_one()
        with engine.begin() as other:
            other.execute(sa.text("UPDATE scratch SET v = v + 1 WHERE k = 1"))
        conn.execute(sa.text("UPDATE scratch SET v = 0 WHERE k = 1"))

    policy = db.RetryPolicy(max_attempts=3, base_delay=0.001, max_delay=0.002)
    with pytest.raises(errors.Unavailable):
        db.run_transaction(engine, always_conflicts, policy=policy)
    assert calls == 3


def test_domain_errors_are_not_retried(engine: Engine) -> None:
    calls = 0

    def refuse(conn: Connection) -> None:
        nonlocal calls
        calls += 1
        conn.execute(sa.text("SELECT 1"))
        raise errors.FailedPrecondition("no", reason="NO")

    with pytest.raises(errors.FailedPrecondition):
        db.run_transaction(engine, refuse)
    assert calls == 1


def test_a_killed_connection_is_retried_on_a_new_one(engine: Engine) -> None:
    seen_pids: list[int] = []

    def work(conn: Connection) -> int:
        pid = int(conn.execute(sa.text("SELECT pg_backend_pid()")).scalar_one())
        seen_pids.append(pid)
        if len(seen_pids) == 1:
            killer = threading.Thread(target=_terminate, args=(engine, pid))
            killer.start()
            killer.join()
            conn.execute(sa.text("SELECT 1"))
        return pid

    final = db.run_transaction(engine, work)
    assert len(seen_pids) == 2
    assert final != seen_pids[0]


def _terminate(engine: Engine, pid: int) -> None:
    with engine.connect() as conn:
        conn.execute(sa.text("SELECT pg_terminate_backend(:p)"), {"p": pid})
        conn.commit()
