"""What the ledger's use cases need from storage, as protocols.

``services.ledger.sql`` implements them on SQLAlchemy; the unit tests implement them
in memory. A ``TransactionRunner`` runs a unit of work atomically (and, for the SQL
one, re-runs it whole on retryable database errors).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol, TypeVar

from services.ledger.model import Account, Transfer

T = TypeVar("T")

# Keyset position: (created_at, id) of the last row of the previous page.
Cursor = tuple[datetime, uuid.UUID]


@dataclass(frozen=True)
class StoredResponse:
    method: str
    fingerprint: bytes
    response: bytes


class AccountRepository(Protocol):
    def get(self, account_id: uuid.UUID) -> Account | None: ...

    def lock(self, account_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Account]:
        """Read and lock the accounts for update, in id order (no deadlocks between transfers)."""
        ...

    def add(self, account: Account) -> None: ...

    def save(self, *accounts: Account) -> None:
        """Persist changed balances or states (all of them in one round trip)."""
        ...

    def list_by_owner(self, owner: str, after: Cursor | None, limit: int) -> list[Account]:
        """The owner's accounts, oldest first, strictly after ``after``."""
        ...

    def currency_exists(self, code: str) -> bool: ...


class TransferRepository(Protocol):
    def add(self, transfer: Transfer) -> None:
        """Insert the transfer and its entries (one statement)."""
        ...

    def get(self, transfer_id: uuid.UUID) -> Transfer | None: ...

    def list_for_account(
        self, account_id: uuid.UUID, before: Cursor | None, limit: int
    ) -> list[Transfer]:
        """Transfers into or out of the account, newest first, strictly before ``before``."""
        ...


class IdempotencyStore(Protocol):
    def get(self, principal: str, request_id: str) -> StoredResponse | None: ...

    def add(
        self, principal: str, request_id: str, method: str, fingerprint: bytes, response: bytes
    ) -> bool:
        """Store the response under the key; False (nothing stored) if the key exists.

        Must not lock more than the new key: no lookup that finds nothing (see
        ``LedgerService._idempotent``)."""
        ...


class LedgerUnitOfWork(Protocol):
    @property
    def accounts(self) -> AccountRepository: ...

    @property
    def transfers(self) -> TransferRepository: ...

    @property
    def idempotency(self) -> IdempotencyStore: ...

    def staleness_seconds(self) -> float:
        """An upper bound on how far this connection's data lags the primary (0 on it)."""
        ...


class TransactionRunner(Protocol):
    def __call__(self, work: Callable[[LedgerUnitOfWork], T], *, readonly: bool = False) -> T: ...


class LedgerEvents(Protocol):
    """What the use cases report once a transaction has committed (metrics, at the edge).

    Called after the commit, never inside the transaction: a retried attempt is not
    counted twice, and a rolled-back one not at all.
    """

    def transfer_committed(self, currency_code: str, amount_minor: int) -> None: ...

    def request_replayed(self, method: str) -> None:
        """A request_id seen before: the stored response was returned, nothing applied."""
        ...


class NoEvents:
    """LedgerEvents that go nowhere (tests, operator commands)."""

    def transfer_committed(self, currency_code: str, amount_minor: int) -> None:
        del currency_code, amount_minor

    def request_replayed(self, method: str) -> None:
        del method
