"""An in-memory ledger unit of work with all-or-nothing transactions, for unit tests."""

from __future__ import annotations

import copy
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TypeVar

from services.ledger.model import Account, Transfer
from services.ledger.ports import Cursor, LedgerUnitOfWork, StoredResponse

T = TypeVar("T")


@dataclass
class LedgerState:
    accounts: dict[uuid.UUID, Account] = field(default_factory=dict)
    transfers: dict[uuid.UUID, Transfer] = field(default_factory=dict)
    keys: dict[tuple[str, str], StoredResponse] = field(default_factory=dict)
    currencies: set[str] = field(default_factory=lambda: {"USD", "EUR", "JPY"})


class FakeAccounts:
    def __init__(self, state: LedgerState) -> None:
        self._s = state

    def get(self, account_id: uuid.UUID) -> Account | None:
        return self._s.accounts.get(account_id)

    def lock(self, account_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, Account]:
        return {i: self._s.accounts[i] for i in account_ids if i in self._s.accounts}

    def add(self, account: Account) -> None:
        assert account.account_id not in self._s.accounts
        self._s.accounts[account.account_id] = account

    def save(self, *accounts: Account) -> None:
        for account in accounts:
            assert account.account_id in self._s.accounts
            self._s.accounts[account.account_id] = account

    def list_by_owner(self, owner: str, after: Cursor | None, limit: int) -> list[Account]:
        rows = sorted(
            (a for a in self._s.accounts.values() if a.owner == owner),
            key=lambda a: (a.created_at, a.account_id),
        )
        if after is not None:
            rows = [a for a in rows if (a.created_at, a.account_id) > after]
        return rows[:limit]

    def currency_exists(self, code: str) -> bool:
        return code in self._s.currencies


class FakeTransfers:
    def __init__(self, state: LedgerState) -> None:
        self._s = state

    def add(self, transfer: Transfer) -> None:
        assert sum(e.amount_minor for e in transfer.entries) == 0
        self._s.transfers[transfer.transfer_id] = transfer

    def get(self, transfer_id: uuid.UUID) -> Transfer | None:
        return self._s.transfers.get(transfer_id)

    def list_for_account(
        self, account_id: uuid.UUID, before: Cursor | None, limit: int
    ) -> list[Transfer]:
        rows = sorted(
            (
                t
                for t in self._s.transfers.values()
                if account_id in (t.source_account_id, t.destination_account_id)
            ),
            key=lambda t: (t.created_at, t.transfer_id),
            reverse=True,
        )
        if before is not None:
            rows = [t for t in rows if (t.created_at, t.transfer_id) < before]
        return rows[:limit]


class FakeIdempotency:
    def __init__(self, state: LedgerState) -> None:
        self._s = state

    def get(self, principal: str, request_id: str) -> StoredResponse | None:
        return self._s.keys.get((principal, request_id))

    def add(
        self, principal: str, request_id: str, method: str, fingerprint: bytes, response: bytes
    ) -> bool:
        if (principal, request_id) in self._s.keys:
            return False
        self._s.keys[(principal, request_id)] = StoredResponse(method, fingerprint, response)
        return True


class FakeUnitOfWork:
    def __init__(self, state: LedgerState, staleness: float = 0.0) -> None:
        self.accounts = FakeAccounts(state)
        self.transfers = FakeTransfers(state)
        self.idempotency = FakeIdempotency(state)
        self._staleness = staleness

    def staleness_seconds(self) -> float:
        return self._staleness


class FakeRunner:
    """Runs each unit of work on a copy of the state and keeps it only if no error escaped."""

    def __init__(self, state: LedgerState | None = None) -> None:
        self.state = state or LedgerState()
        self.transactions = 0
        self._lock = threading.Lock()

    def __call__(self, work: Callable[[LedgerUnitOfWork], T], *, readonly: bool = False) -> T:
        with self._lock:
            draft = copy.deepcopy(self.state)
            result = work(FakeUnitOfWork(draft))
            if not readonly:
                self.state = draft
            self.transactions += 1
            return result
