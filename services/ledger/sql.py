"""The ledger's ports on SQLAlchemy Core (PostgreSQL and CockroachDB)."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.postgresql.psycopg import dialect as psycopg_dialect
from sqlalchemy.engine import Connection, Engine

from services.common import db
from services.common.schema import accounts, currencies, idempotency_keys, ledger_entries, transfers
from services.ledger.model import Account, AccountState, Entry, Transfer
from services.ledger.ports import Cursor, StoredResponse

# The statements of the transfer transaction, built once: building a statement and its
# cache key on every call was a tenth of the transfer service's CPU (docs/benchmarks.md).
_LOCK_ACCOUNTS = (
    sa.select(accounts)
    .where(accounts.c.account_id.in_(sa.bindparam("account_ids", expanding=True)))
    .order_by(accounts.c.account_id)
    .with_for_update()
)
_SAVE_ACCOUNT = (
    accounts.update()
    .where(accounts.c.account_id == sa.bindparam("b_account_id"))
    .values(
        balance_minor=sa.bindparam("balance_minor"),
        state=sa.bindparam("state"),
        closed_at=sa.bindparam("closed_at"),
    )
)
_TRANSFER_COLUMNS = (
    "transfer_id",
    "request_id",
    "initiated_by",
    "source_account_id",
    "destination_account_id",
    "amount_minor",
    "currency_code",
    "description",
    "created_at",
)
_ENTRY_COLUMNS = ("entry_id", "account_id", "amount_minor", "currency_code")


def _insert_transfer(entry_count: int) -> sa.Insert:
    """The transfer and its ``entry_count`` entries in one statement: the transfer's
    INSERT as a data-modifying CTE, the entries' INSERT under it (their foreign key is
    checked at the end of the statement). One round trip fewer while the accounts are
    locked than two INSERTs."""
    transfer = (
        transfers.insert()
        .values({c: sa.bindparam(f"t_{c}") for c in _TRANSFER_COLUMNS})
        .cte("new_transfer")
    )
    rows: list[dict[str, Any]] = [
        {
            "transfer_id": sa.bindparam("t_transfer_id"),
            "created_at": sa.bindparam("t_created_at"),
            **{c: sa.bindparam(f"e{i}_{c}") for c in _ENTRY_COLUMNS},
        }
        for i in range(entry_count)
    ]
    return ledger_entries.insert().values(rows).add_cte(transfer)


class _CompiledOnce:
    """A fixed statement that SQLAlchemy cannot cache, compiled once at import.

    SQLAlchemy 2.0 gives no cache key to a multi-row VALUES nor to the PostgreSQL
    dialect's INSERT (ON CONFLICT), so it compiled both INSERTs of a transfer again on
    every execution ("[no key]" in its log): 6% of the transfer service's samples under
    load (py-spy, docs/benchmarks.md). Compiled here for psycopg, which both engines use
    (``postgresql+psycopg``, ``cockroachdb+psycopg``: the same SQL and parameter style),
    and sent as is; the engine's events (spans, notices) still see every execution.
    """

    def __init__(self, statement: sa.Insert) -> None:
        self.sql = str(statement.compile(dialect=psycopg_dialect()))  # type: ignore[no-untyped-call]

    def __call__(self, conn: Connection, params: dict[str, Any]) -> sa.CursorResult[Any]:
        return conn.exec_driver_sql(self.sql, params)


# A transfer has exactly two entries (model.Transfer.entries: the debit and the credit).
_INSERT_TRANSFER = _CompiledOnce(_insert_transfer(2))

_KEY_COLUMNS = ("principal", "request_id", "method", "fingerprint", "response")
_ADD_KEY = _CompiledOnce(
    pg_insert(idempotency_keys)
    .values({c: sa.bindparam(c) for c in _KEY_COLUMNS})
    .on_conflict_do_nothing(index_elements=["principal", "request_id"])
    .returning(idempotency_keys.c.request_id)
)


def _account(row: Any) -> Account:
    return Account(
        account_id=row.account_id,
        owner=row.owner,
        display_name=row.display_name,
        currency_code=row.currency_code,
        balance_minor=row.balance_minor,
        overdraft_limit_minor=row.overdraft_limit_minor,
        state=AccountState(row.state),
        created_at=row.created_at,
        closed_at=row.closed_at,
        home_region=row.home_region,
    )


class SqlAccounts:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def get(self, account_id: uuid.UUID) -> Account | None:
        row = self._conn.execute(
            sa.select(accounts).where(accounts.c.account_id == account_id)
        ).one_or_none()
        return None if row is None else _account(row)

    def lock(self, account_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Account]:
        rows = self._conn.execute(_LOCK_ACCOUNTS, {"account_ids": list(account_ids)}).all()
        return {row.account_id: _account(row) for row in rows}

    def add(self, account: Account) -> None:
        self._conn.execute(
            accounts.insert().values(
                account_id=account.account_id,
                owner=account.owner,
                display_name=account.display_name,
                currency_code=account.currency_code,
                balance_minor=account.balance_minor,
                overdraft_limit_minor=account.overdraft_limit_minor,
                state=account.state.value,
                created_at=account.created_at,
                closed_at=account.closed_at,
                home_region=account.home_region,
            )
        )

    def save(self, *accounts: Account) -> None:
        # Several parameter sets: psycopg's executemany pipelines them, one round trip.
        self._conn.execute(
            _SAVE_ACCOUNT,
            [
                {
                    "b_account_id": account.account_id,
                    "balance_minor": account.balance_minor,
                    "state": account.state.value,
                    "closed_at": account.closed_at,
                }
                for account in accounts
            ],
        )

    def list_by_owner(self, owner: str, after: Cursor | None, limit: int) -> list[Account]:
        query = sa.select(accounts).where(accounts.c.owner == owner)
        if after is not None:
            query = query.where(
                sa.tuple_(accounts.c.created_at, accounts.c.account_id)
                > sa.tuple_(
                    sa.literal(after[0], accounts.c.created_at.type),
                    sa.literal(after[1], accounts.c.account_id.type),
                )
            )
        query = query.order_by(accounts.c.created_at, accounts.c.account_id).limit(limit)
        return [_account(row) for row in self._conn.execute(query)]

    def currency_exists(self, code: str) -> bool:
        return (
            self._conn.execute(
                sa.select(currencies.c.code).where(currencies.c.code == code)
            ).one_or_none()
            is not None
        )


class SqlTransfers:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def add(self, transfer: Transfer) -> None:
        params: dict[str, Any] = {f"t_{c}": getattr(transfer, c) for c in _TRANSFER_COLUMNS}
        for i, entry in enumerate(transfer.entries):
            params.update({f"e{i}_{c}": getattr(entry, c) for c in _ENTRY_COLUMNS})
        _INSERT_TRANSFER(self._conn, params)

    def _hydrate(self, rows: Sequence[Any]) -> list[Transfer]:
        if not rows:
            return []
        ids = [r.transfer_id for r in rows]
        entries: dict[uuid.UUID, list[Entry]] = {i: [] for i in ids}
        for e in self._conn.execute(
            sa.select(ledger_entries)
            .where(ledger_entries.c.transfer_id.in_(ids))
            .order_by(ledger_entries.c.amount_minor)  # debit (negative) first
        ):
            entries[e.transfer_id].append(
                Entry(e.entry_id, e.account_id, e.amount_minor, e.currency_code)
            )
        result = []
        for r in rows:
            debit, credit = entries[r.transfer_id]
            result.append(
                Transfer(
                    transfer_id=r.transfer_id,
                    request_id=r.request_id,
                    initiated_by=r.initiated_by,
                    source_account_id=r.source_account_id,
                    destination_account_id=r.destination_account_id,
                    amount_minor=r.amount_minor,
                    currency_code=r.currency_code,
                    description=r.description,
                    created_at=r.created_at,
                    entries=(debit, credit),
                )
            )
        return result

    def get(self, transfer_id: uuid.UUID) -> Transfer | None:
        rows = self._conn.execute(
            sa.select(transfers).where(transfers.c.transfer_id == transfer_id)
        ).all()
        found = self._hydrate(rows)
        return found[0] if found else None

    def list_for_account(
        self, account_id: uuid.UUID, before: Cursor | None, limit: int
    ) -> list[Transfer]:
        # One index range scan per side (source, destination), merged: an OR over both
        # columns could not use the (account, created_at, id) indexes for ordering.
        key = sa.tuple_(transfers.c.created_at, transfers.c.transfer_id)
        sides = []
        for column in (transfers.c.source_account_id, transfers.c.destination_account_id):
            q = sa.select(transfers).where(column == account_id)
            if before is not None:
                q = q.where(
                    key
                    < sa.tuple_(
                        sa.literal(before[0], transfers.c.created_at.type),
                        sa.literal(before[1], transfers.c.transfer_id.type),
                    )
                )
            sides.append(
                q.order_by(transfers.c.created_at.desc(), transfers.c.transfer_id.desc()).limit(
                    limit
                )
            )
        union = sa.union_all(*sides).subquery()
        rows = self._conn.execute(
            sa.select(union)
            .order_by(union.c.created_at.desc(), union.c.transfer_id.desc())
            .limit(limit)
        ).all()
        return self._hydrate(rows)


class SqlIdempotency:
    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def get(self, principal: str, request_id: str) -> StoredResponse | None:
        row = self._conn.execute(
            sa.select(
                idempotency_keys.c.method,
                idempotency_keys.c.fingerprint,
                idempotency_keys.c.response,
            ).where(
                idempotency_keys.c.principal == principal,
                idempotency_keys.c.request_id == request_id,
            )
        ).one_or_none()
        if row is None:
            return None
        return StoredResponse(row.method, bytes(row.fingerprint), bytes(row.response))

    def add(
        self, principal: str, request_id: str, method: str, fingerprint: bytes, response: bytes
    ) -> bool:
        # INSERT ... ON CONFLICT DO NOTHING checks the key with a dirty snapshot, which
        # takes no SSI predicate lock. If a concurrent transaction stored the same key
        # and committed after this one began, PostgreSQL raises a serialization failure
        # (and CockroachDB its retry error): the retry finds the key and replays it.
        inserted = _ADD_KEY(
            self._conn,
            {
                "principal": principal,
                "request_id": request_id,
                "method": method,
                "fingerprint": fingerprint,
                "response": response,
            },
        ).first()
        return inserted is not None


# How stale a standby's answer may be. On the primary: 0. On a standby that has
# replayed everything it received: the time since it last heard from the primary (while
# streaming), or, once the primary is gone (during a failover there is no WAL receiver),
# the age of the last transaction it replayed. Otherwise the age of the last replayed
# transaction. Under load these are tight; on an idle disconnected standby they
# overestimate, which errs on the safe side (the read falls back to the primary).
STALENESS_SQL = sa.text(
    """
    SELECT CASE
      WHEN NOT pg_is_in_recovery() THEN 0.0
      WHEN pg_last_wal_receive_lsn() = pg_last_wal_replay_lsn() THEN coalesce(
        (SELECT extract(epoch FROM now() - last_msg_receipt_time) FROM pg_stat_wal_receiver
          WHERE status = 'streaming'),
        extract(epoch FROM now() - pg_last_xact_replay_timestamp()),
        1e9)
      ELSE coalesce(extract(epoch FROM now() - pg_last_xact_replay_timestamp()), 1e9)
    END
    """
)


class SqlUnitOfWork:
    """The three repositories over one connection inside one transaction."""

    def __init__(self, conn: Connection) -> None:
        self._conn = conn
        self.accounts = SqlAccounts(conn)
        self.transfers = SqlTransfers(conn)
        self.idempotency = SqlIdempotency(conn)

    def staleness_seconds(self) -> float:
        if self._conn.dialect.name != "postgresql":
            return 0.0  # CockroachDB follower reads report their own bound
        return max(0.0, float(self._conn.execute(STALENESS_SQL).scalar_one()))


def transaction_runner(
    engine: Engine,
    *,
    policy: db.RetryPolicy = db.DEFAULT_POLICY,
    on_retry: db.RetryObserver | None = None,
) -> db.UnitOfWorkRunner[SqlUnitOfWork]:
    """The ledger's TransactionRunner: its unit of work over the retry helper."""
    return db.UnitOfWorkRunner(engine, SqlUnitOfWork, policy=policy, on_retry=on_retry)
