"""The ledger auditor's invariant check against the real PostgreSQL: a ledger written
by the services passes; a deliberately broken one (written with the guards disabled,
in a throwaway database) is caught, invariant by invariant."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest
import sqlalchemy as sa
from prometheus_client import CollectorRegistry
from sqlalchemy.engine import Engine

from regions import migrate
from regions.postgres import PostgresNode
from services import auditor
from services.common.config import ConfigError
from services.common.db import make_engine, run_transaction
from services.ledger import invariants
from tests.integration.conftest import Stack
from tests.support import free_port

NOW = datetime(2026, 12, 1, tzinfo=UTC)


def test_the_ledger_the_services_wrote_passes(stack: Stack, engine: Engine) -> None:
    accounts = [stack.open(stack.user()) for _ in range(3)]
    for i, account in enumerate(accounts):
        stack.fund(account, 1000 * (i + 1))
    report = run_transaction(engine, invariants.check, readonly=True)
    assert report.ok, report.summary()
    usd = next(c for c in report.currencies if c.currency == "USD")
    assert usd.entries >= 6
    assert usd.entry_sum_minor == 0
    assert {c.currency for c in report.currencies} >= {"USD", "EUR", "JPY"}


@pytest.fixture
def broken_db(pg_node: PostgresNode) -> Iterator[str]:
    """A throwaway, migrated database; dropped afterwards."""
    name = f"invariants_{secrets.token_hex(4)}"
    pg_node.create_database(name)
    url = pg_node.url(name)
    try:
        migrate.upgrade(url)
        yield url
    finally:
        admin = sa.create_engine(pg_node.url("postgres"), isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.execute(sa.text(f'DROP DATABASE "{name}" WITH (FORCE)'))
        admin.dispose()


def _account(conn: sa.Connection, balance: int, currency: str = "USD") -> uuid.UUID:
    account_id = uuid.uuid4()
    conn.execute(
        sa.text(
            "INSERT INTO accounts (account_id, owner, display_name, currency_code, balance_minor,"
            " overdraft_limit_minor, state, created_at, home_region)"
            " VALUES (:id, 'users/t', 't', :cur, :bal, 100000, 'open', :now, 'us-east')"
        ),
        {"id": account_id, "cur": currency, "bal": balance, "now": NOW},
    )
    return account_id


def _transfer(
    conn: sa.Connection,
    source: uuid.UUID,
    destination: uuid.UUID,
    entries: list[tuple[uuid.UUID, int, str]],
    amount: int = 100,
) -> uuid.UUID:
    transfer_id = uuid.uuid4()
    conn.execute(
        sa.text(
            "INSERT INTO transfers (transfer_id, request_id, initiated_by, source_account_id,"
            " destination_account_id, amount_minor, currency_code, description, created_at)"
            " VALUES (:id, :rid, 'users/t', :src, :dst, :amount, 'USD', '', :now)"
        ),
        {
            "id": transfer_id,
            "rid": str(transfer_id),
            "src": source,
            "dst": destination,
            "amount": amount,
            "now": NOW,
        },
    )
    for account_id, amount_minor, currency in entries:
        conn.execute(
            sa.text(
                "INSERT INTO ledger_entries (entry_id, transfer_id, account_id, amount_minor,"
                " currency_code, created_at) VALUES (:id, :t, :a, :amount, :cur, :now)"
            ),
            {
                "id": uuid.uuid4(),
                "t": transfer_id,
                "a": account_id,
                "amount": amount_minor,
                "cur": currency,
                "now": NOW,
            },
        )
    return transfer_id


def _write_with_guards_off(url: str, build: Callable[[sa.Connection], None]) -> None:
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            # Disables the triggers (append-only, balanced transfer), as a restore or a
            # hand-written fix with replication role would: exactly what the audit is for.
            conn.execute(sa.text("SET LOCAL session_replication_role = replica"))
            build(conn)
    finally:
        engine.dispose()


def _check(url: str) -> invariants.InvariantReport:
    engine = make_engine(url, pool_size=1, isolation_level=auditor.ISOLATION)
    try:
        return run_transaction(engine, invariants.check, readonly=True)
    finally:
        engine.dispose()


def test_a_consistent_crafted_ledger_passes(broken_db: str) -> None:
    def build(conn: sa.Connection) -> None:
        a, b = _account(conn, -100), _account(conn, 100)
        _transfer(conn, a, b, [(a, -100, "USD"), (b, 100, "USD")])

    _write_with_guards_off(broken_db, build)
    report = _check(broken_db)
    assert report.ok, report.summary()


def test_each_broken_invariant_is_detected(broken_db: str) -> None:
    ids: dict[str, uuid.UUID] = {}

    def build(conn: sa.Connection) -> None:
        # A good transfer, to show that only the bad rows are reported.
        a, b = _account(conn, -100), _account(conn, 100)
        _transfer(conn, a, b, [(a, -100, "USD"), (b, 100, "USD")])
        # Money created from nothing: the credit is larger than the debit.
        c, d = _account(conn, -100), _account(conn, 150)
        ids["unbalanced"] = _transfer(conn, c, d, [(c, -100, "USD"), (d, 150, "USD")])
        # A balance changed without an entry.
        ids["drifted"] = _account(conn, 42)
        # An entry in another currency than its account's (and its transfer's).
        e, f = _account(conn, -100), _account(conn, 100)
        ids["foreign"] = _transfer(conn, e, f, [(e, -100, "USD"), (f, 100, "EUR")])

    _write_with_guards_off(broken_db, build)
    report = _check(broken_db)
    assert not report.ok
    v = report.violations
    # USD entries sum to +50 - 100 = -50; EUR to +100.
    assert v["currency_sum"] == invariants.Violations(2, ("EUR", "USD"))
    sums = {c.currency: c.entry_sum_minor for c in report.currencies}
    assert sums["USD"] == 50 - 100
    assert sums["EUR"] == 100
    assert v["account_balance"] == invariants.Violations(1, (str(ids["drifted"]),))
    assert v["transfer_balance"].count == 2
    assert set(v["transfer_balance"].examples) == {str(ids["unbalanced"]), str(ids["foreign"])}
    assert v["entry_currency"].count == 1
    assert "LEDGER INVARIANTS BROKEN" in report.summary()


def test_the_auditor_exports_a_broken_ledger_and_exits_1(
    broken_db: str, pg_node: PostgresNode, monkeypatch: pytest.MonkeyPatch
) -> None:
    def build(conn: sa.Connection) -> None:
        _account(conn, 7)  # a balance with no entries

    _write_with_guards_off(broken_db, build)
    # The deployment's URL shape: several hosts, standbys preferred; the first is dead,
    # so this also shows the check following the hosts list to a live member.
    dead = free_port()
    name = broken_db.rpartition("/")[2]
    url = (
        f"postgresql+psycopg://meshbank:{pg_node.password}@/{name}"
        f"?host=127.0.0.1:{dead}&host=127.0.0.1:{pg_node.port}"
        "&target_session_attrs=prefer-standby&connect_timeout=2"
    )
    engine = make_engine(url, pool_size=1, isolation_level=auditor.ISOLATION)
    registry = CollectorRegistry()
    try:
        report = auditor.Auditor(engine, registry).check_once()
    finally:
        engine.dispose()
    assert not report.ok
    get = registry.get_sample_value
    assert get("meshbank_ledger_invariant_ok") == 0
    assert get("meshbank_ledger_invariant_violations", {"invariant": "account_balance"}) == 1
    assert get("meshbank_ledger_invariant_violations", {"invariant": "currency_sum"}) == 0
    assert (get("meshbank_ledger_check_last_success_timestamp_seconds") or 0) > 0

    monkeypatch.setenv("MESHBANK_DATABASE_URL", url)
    assert auditor.main(["--once"]) == 1


def test_the_auditor_refuses_a_bad_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESHBANK_DATABASE_URL", raising=False)
    monkeypatch.setenv("MESHBANK_AUDIT_INTERVAL_SECONDS", "0")
    monkeypatch.delenv("MESHBANK_METRICS_ADDRESS", raising=False)
    assert auditor.main([]) == 2
    with pytest.raises(ConfigError) as exc:
        auditor.load_config({"MESHBANK_AUDIT_INTERVAL_SECONDS": "x"}, needs_metrics=True)
    for name in ("MESHBANK_DATABASE_URL", "MESHBANK_METRICS_ADDRESS", "INTERVAL_SECONDS"):
        assert name in str(exc.value)
