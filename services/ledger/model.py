"""The ledger's domain model and rules: no gRPC, no SQL.

Money is an integer number of minor units plus an ISO-4217 code. A transfer becomes
two entries, a debit and a credit, that sum to zero; a balance is the sum of its
account's entries and is kept on the account in the same transaction.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from datetime import datetime
from enum import StrEnum

from services.common import errors

# Balances and amounts are int64 on the wire and BIGINT in the database.
INT64_MAX = 2**63 - 1


class AccountState(StrEnum):
    OPEN = "open"
    CLOSED = "closed"


@dataclass(frozen=True)
class Account:
    account_id: uuid.UUID
    owner: str
    display_name: str
    currency_code: str
    balance_minor: int
    overdraft_limit_minor: int
    state: AccountState
    created_at: datetime
    closed_at: datetime | None = None
    home_region: str = ""

    @property
    def available_minor(self) -> int:
        """How much can leave the account: balance plus overdraft headroom."""
        return self.balance_minor + self.overdraft_limit_minor

    def close(self, now: datetime) -> Account:
        if self.state is AccountState.CLOSED:
            raise errors.FailedPrecondition(
                "the account is already closed",
                reason="ACCOUNT_CLOSED",
                metadata={"subject": f"accounts/{self.account_id}"},
            )
        if self.balance_minor != 0:
            raise errors.FailedPrecondition(
                "only an account with a zero balance can be closed",
                reason="ACCOUNT_BALANCE_NOT_ZERO",
                metadata={"subject": f"accounts/{self.account_id}"},
            )
        return replace(self, state=AccountState.CLOSED, closed_at=now)


@dataclass(frozen=True)
class Entry:
    entry_id: uuid.UUID
    account_id: uuid.UUID
    amount_minor: int
    currency_code: str


@dataclass(frozen=True)
class Transfer:
    transfer_id: uuid.UUID
    request_id: str
    initiated_by: str
    source_account_id: uuid.UUID
    destination_account_id: uuid.UUID
    amount_minor: int
    currency_code: str
    description: str
    created_at: datetime
    entries: tuple[Entry, Entry]


@dataclass(frozen=True)
class Posting:
    """The outcome of applying a transfer: the transfer and both updated accounts."""

    transfer: Transfer
    source: Account
    destination: Account


def _precondition(reason: str, message: str, account: Account) -> errors.FailedPrecondition:
    return errors.FailedPrecondition(
        message, reason=reason, metadata={"subject": f"accounts/{account.account_id}"}
    )


def post_transfer(
    *,
    transfer_id: uuid.UUID,
    request_id: str,
    initiated_by: str,
    source: Account,
    destination: Account,
    amount_minor: int,
    currency_code: str,
    description: str,
    now: datetime,
    entry_ids: tuple[uuid.UUID, uuid.UUID],
) -> Posting:
    """Apply the ledger rules and return the transfer and the new account states.

    Raises InvalidArgument for a malformed transfer and FailedPrecondition when the
    accounts' state forbids it (closed, wrong currency, not enough money).
    """
    violations = errors.Violations()
    if amount_minor <= 0:
        violations.add("amount_minor", "must be positive")
    if source.account_id == destination.account_id:
        violations.add("destination_account_id", "must differ from source_account_id")
    violations.raise_if_any()

    for account in (source, destination):
        if account.state is not AccountState.OPEN:
            raise _precondition(
                "ACCOUNT_CLOSED", f"account {account.account_id} is closed", account
            )
    for account in (source, destination):
        if account.currency_code != currency_code:
            raise _precondition(
                "CURRENCY_MISMATCH",
                f"account {account.account_id} holds {account.currency_code}, not {currency_code}",
                account,
            )
    if amount_minor > source.available_minor:
        raise _precondition(
            "INSUFFICIENT_FUNDS", "the source account has insufficient funds", source
        )
    if destination.balance_minor > INT64_MAX - amount_minor:
        raise _precondition(
            "BALANCE_OVERFLOW", "the destination balance would overflow int64", destination
        )

    debit = Entry(entry_ids[0], source.account_id, -amount_minor, currency_code)
    credit = Entry(entry_ids[1], destination.account_id, amount_minor, currency_code)
    transfer = Transfer(
        transfer_id=transfer_id,
        request_id=request_id,
        initiated_by=initiated_by,
        source_account_id=source.account_id,
        destination_account_id=destination.account_id,
        amount_minor=amount_minor,
        currency_code=currency_code,
        description=description,
        created_at=now,
        entries=(debit, credit),
    )
    return Posting(
        transfer=transfer,
        source=replace(source, balance_minor=source.balance_minor - amount_minor),
        destination=replace(destination, balance_minor=destination.balance_minor + amount_minor),
    )
