"""The ledger rules on plain values."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import pytest

from services.common import errors
from services.ledger.model import INT64_MAX, Account, AccountState, post_transfer

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def account(
    balance: int = 0, *, currency: str = "USD", overdraft: int = 0, **kw: object
) -> Account:
    fields: dict[str, object] = {
        "account_id": uuid.uuid4(),
        "owner": "users/alice",
        "display_name": "a",
        "currency_code": currency,
        "balance_minor": balance,
        "overdraft_limit_minor": overdraft,
        "state": AccountState.OPEN,
        "created_at": NOW,
    }
    fields.update(kw)
    return Account(**fields)  # type: ignore[arg-type]


def post(source: Account, destination: Account, amount: int, currency: str = "USD"):  # type: ignore[no-untyped-def]
    return post_transfer(
        transfer_id=uuid.uuid4(),
        request_id="r1",
        initiated_by="users/alice",
        source=source,
        destination=destination,
        amount_minor=amount,
        currency_code=currency,
        description="",
        now=NOW,
        entry_ids=(uuid.uuid4(), uuid.uuid4()),
    )


def test_posting_moves_money_with_two_entries_summing_to_zero() -> None:
    posting = post(account(500), account(20), 300)
    debit, credit = posting.transfer.entries
    assert (debit.amount_minor, credit.amount_minor) == (-300, 300)
    assert debit.account_id == posting.source.account_id
    assert posting.source.balance_minor == 200
    assert posting.destination.balance_minor == 320


def test_exact_balance_can_be_spent_but_not_one_unit_more() -> None:
    assert post(account(300), account(), 300).source.balance_minor == 0
    with pytest.raises(errors.FailedPrecondition) as exc:
        post(account(300), account(), 301)
    assert exc.value.reason == "INSUFFICIENT_FUNDS"


def test_overdraft_allows_going_negative_down_to_the_limit() -> None:
    assert post(account(0, overdraft=100), account(), 100).source.balance_minor == -100
    with pytest.raises(errors.FailedPrecondition):
        post(account(0, overdraft=100), account(), 101)


@pytest.mark.parametrize("amount", [0, -1, -(2**63)])
def test_non_positive_amounts_are_invalid(amount: int) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        post(account(500), account(), amount)
    assert [v.field for v in exc.value.violations] == ["amount_minor"]


def test_same_account_is_invalid() -> None:
    a = account(500)
    with pytest.raises(errors.InvalidArgument) as exc:
        post(a, a, 10)
    assert exc.value.violations[0].field == "destination_account_id"


def test_currency_must_match_both_accounts() -> None:
    with pytest.raises(errors.FailedPrecondition) as exc:
        post(account(500), account(currency="EUR"), 10)
    assert exc.value.reason == "CURRENCY_MISMATCH"
    with pytest.raises(errors.FailedPrecondition):
        post(account(500), account(), 10, currency="EUR")


@pytest.mark.parametrize("side", ["source", "destination"])
def test_closed_accounts_neither_send_nor_receive(side: str) -> None:
    closed = account(500, state=AccountState.CLOSED)
    args = (closed, account()) if side == "source" else (account(500), closed)
    with pytest.raises(errors.FailedPrecondition) as exc:
        post(*args, 10)
    assert exc.value.reason == "ACCOUNT_CLOSED"


def test_destination_balance_cannot_overflow_int64() -> None:
    with pytest.raises(errors.FailedPrecondition) as exc:
        post(account(10), account(INT64_MAX - 5), 10)
    assert exc.value.reason == "BALANCE_OVERFLOW"


def test_close_needs_zero_balance_and_an_open_account() -> None:
    with pytest.raises(errors.FailedPrecondition) as exc:
        account(1).close(NOW)
    assert exc.value.reason == "ACCOUNT_BALANCE_NOT_ZERO"
    closed = account(0).close(NOW)
    assert closed.state is AccountState.CLOSED
    assert closed.closed_at == NOW
    with pytest.raises(errors.FailedPrecondition):
        closed.close(NOW)
