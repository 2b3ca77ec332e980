"""TransferService end to end over real sockets: ledger rules, idempotency, races."""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine

from meshbank.account.v1 import account_pb2
from meshbank.transfer.v1 import transfer_pb2
from tests.integration.conftest import Caller, Stack
from tests.support import failure

Code = grpc.StatusCode


def pay(
    stack: Stack, who: Caller, src: str, dst: str, amount: int, request_id: str = "", **kw: object
) -> transfer_pb2.Transfer:
    request = transfer_pb2.CreateTransferRequest(
        request_id=request_id or stack.unique("t-"),
        source_account_id=src,
        destination_account_id=dst,
        amount_minor=amount,
        currency_code=str(kw.pop("currency_code", "USD")),
        **kw,  # type: ignore[arg-type]
    )
    return stack.transfers.CreateTransfer(request, metadata=who.md).transfer


def test_transfer_moves_both_balances_and_shows_in_get_and_list(stack: Stack) -> None:
    alice, bob = stack.user(), stack.user()
    a, b = stack.open(alice), stack.open(bob)
    stack.fund(a, 10_000)
    t = pay(stack, alice, a, b, 2_550, description="rent")
    assert t.state == transfer_pb2.TRANSFER_STATE_POSTED
    assert t.initiated_by == alice.name
    assert [(e.account_id, e.amount_minor) for e in t.entries] == [(a, -2_550), (b, 2_550)]
    assert stack.balance(alice, a) == 7_450
    assert stack.balance(bob, b) == 2_550

    got = stack.transfers.GetTransfer(
        transfer_pb2.GetTransferRequest(transfer_id=t.transfer_id), metadata=bob.md
    ).transfer
    assert got == t
    listed = stack.transfers.ListTransfers(
        transfer_pb2.ListTransfersRequest(account_id=a), metadata=alice.md
    ).transfers
    assert listed[0].transfer_id == t.transfer_id  # newest first
    assert len(listed) == 2  # the funding transfer, then this one


def test_list_transfers_newest_first_with_pages(stack: Stack) -> None:
    alice, bob = stack.user(), stack.user()
    a, b = stack.open(alice), stack.open(bob)
    stack.fund(a, 100)
    made = [pay(stack, alice, a, b, n).transfer_id for n in range(1, 8)]
    seen: list[str] = []
    token = ""
    while True:
        page = stack.transfers.ListTransfers(
            transfer_pb2.ListTransfersRequest(account_id=b, page_size=3, page_token=token),
            metadata=bob.md,
        )
        seen += [t.transfer_id for t in page.transfers]
        token = page.next_page_token
        if not token:
            break
    assert seen == list(reversed(made))
    other = failure(
        lambda: stack.transfers.ListTransfers(
            transfer_pb2.ListTransfersRequest(
                account_id=a, page_token=page_token_for(stack, bob, b)
            ),
            metadata=alice.md,
        )
    )
    assert other.code == Code.INVALID_ARGUMENT  # a token of another account's listing


def page_token_for(stack: Stack, who: Caller, account_id: str) -> str:
    return stack.transfers.ListTransfers(
        transfer_pb2.ListTransfersRequest(account_id=account_id, page_size=1), metadata=who.md
    ).next_page_token


def test_replay_returns_the_original_transfer_and_moves_money_once(stack: Stack) -> None:
    alice, bob = stack.user(), stack.user()
    a, b = stack.open(alice), stack.open(bob)
    stack.fund(a, 1_000)
    first = pay(stack, alice, a, b, 300, request_id="pay-1")
    second = pay(stack, alice, a, b, 300, request_id="pay-1")
    assert first == second
    assert stack.balance(alice, a) == 700
    different = failure(lambda: pay(stack, alice, a, b, 301, request_id="pay-1"))
    assert (different.code, different.reason) == (Code.ALREADY_EXISTS, "REQUEST_ID_REUSED")
    assert stack.balance(alice, a) == 700


def test_ledger_rules(stack: Stack) -> None:
    alice, bob = stack.user(), stack.user()
    a, b = stack.open(alice), stack.open(bob)
    eur = stack.open(bob, currency="EUR")
    stack.fund(a, 500)

    err = failure(lambda: pay(stack, alice, a, b, 501))
    assert (err.code, err.reason) == (Code.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")
    err = failure(lambda: pay(stack, alice, a, eur, 10))
    assert (err.code, err.reason) == (Code.FAILED_PRECONDITION, "CURRENCY_MISMATCH")
    err = failure(lambda: pay(stack, alice, a, eur, 10, currency_code="EUR"))
    assert (err.code, err.reason) == (Code.FAILED_PRECONDITION, "CURRENCY_MISMATCH")

    closed = stack.open(bob)
    stack.accounts.CloseAccount(
        account_pb2.CloseAccountRequest(request_id="close", account_id=closed), metadata=bob.md
    )
    err = failure(lambda: pay(stack, alice, a, closed, 10))
    assert (err.code, err.reason) == (Code.FAILED_PRECONDITION, "ACCOUNT_CLOSED")

    err = failure(lambda: pay(stack, bob, a, b, 10))
    assert (err.code, err.reason) == (Code.PERMISSION_DENIED, "NOT_ACCOUNT_OWNER")
    err = failure(lambda: pay(stack, alice, a, str(uuid.uuid4()), 10))
    assert err.code == Code.NOT_FOUND
    assert stack.balance(alice, a) == 500  # nothing was half-applied


@pytest.mark.parametrize(
    ("change", "bad_fields"),
    [
        ({"amount_minor": 0}, {"amount_minor"}),
        ({"amount_minor": -5}, {"amount_minor"}),
        ({"amount_minor": -(2**63)}, {"amount_minor"}),
        ({"same": True}, {"destination_account_id"}),
        ({"source_account_id": "nope"}, {"source_account_id"}),
        ({"destination_account_id": ""}, {"destination_account_id"}),
        ({"currency_code": "US"}, {"currency_code"}),
        ({"request_id": ""}, {"request_id"}),
        ({"request_id": "has space"}, {"request_id"}),
        ({"description": "x" * 501}, {"description"}),
        ({"amount_minor": 0, "request_id": ""}, {"amount_minor", "request_id"}),
    ],
)
def test_invalid_transfers_name_their_fields(
    stack: Stack, change: dict[str, object], bad_fields: set[str]
) -> None:
    alice = stack.user()
    a, b = stack.open(alice), stack.open(alice)
    stack.fund(a, 100)
    fields: dict[str, object] = {
        "request_id": stack.unique("bad-"),
        "source_account_id": a,
        "destination_account_id": b,
        "amount_minor": 10,
        "currency_code": "USD",
    }
    if change.pop("same", False):
        fields["destination_account_id"] = a
    fields.update(change)
    err = failure(
        lambda: stack.transfers.CreateTransfer(
            transfer_pb2.CreateTransferRequest(**fields),  # type: ignore[arg-type]
            metadata=alice.md,
        )
    )
    assert err.code == Code.INVALID_ARGUMENT
    assert set(err.field_violations) == bad_fields
    assert stack.balance(alice, a) == 100


def test_huge_amounts_are_refused_without_overflow(stack: Stack) -> None:
    alice = stack.user()
    a, b = stack.open(alice), stack.open(alice)
    stack.fund(a, 100)
    err = failure(lambda: pay(stack, alice, a, b, 2**63 - 1))
    assert (err.code, err.reason) == (Code.FAILED_PRECONDITION, "INSUFFICIENT_FUNDS")


def test_two_transfers_racing_for_one_balance(stack: Stack) -> None:
    """Each round: 100 on the account, two concurrent transfers of 70; exactly one wins."""
    alice, bob = stack.user(), stack.user()
    dest = stack.open(bob)
    for _ in range(8):
        src = stack.open(alice)
        stack.fund(src, 100)
        barrier = threading.Barrier(2)

        def attempt(src: str = src, barrier: threading.Barrier = barrier) -> str:
            barrier.wait()
            try:
                pay(stack, alice, src, dest, 70)
            except grpc.RpcError as err:
                return f"{err.code().name}"
            return "OK"

        with ThreadPoolExecutor(2) as pool:
            results = sorted(pool.map(lambda _: attempt(), range(2)))
        assert results == ["FAILED_PRECONDITION", "OK"]
        assert stack.balance(alice, src) == 30


def test_the_same_request_racing_itself_applies_once(stack: Stack) -> None:
    alice, bob = stack.user(), stack.user()
    a, b = stack.open(alice), stack.open(bob)
    stack.fund(a, 1_000)
    barrier = threading.Barrier(4)

    def attempt(_: int) -> str:
        barrier.wait()
        return pay(stack, alice, a, b, 100, request_id="twin").transfer_id

    with ThreadPoolExecutor(4) as pool:
        ids = set(pool.map(attempt, range(4)))
    assert len(ids) == 1
    assert stack.balance(alice, a) == 900


@settings(
    max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    moves=st.lists(
        st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(-3, 250)), max_size=12
    )
)
def test_random_transfer_sequences_conserve_money(
    stack: Stack, engine: Engine, moves: list[tuple[int, int, int]]
) -> None:
    users = [stack.user() for _ in range(3)]
    accounts = [stack.open(u) for u in users]
    for acc in accounts:
        stack.fund(acc, 200)
    for src, dst, amount in moves:
        try:
            pay(stack, users[src], accounts[src], accounts[dst], amount)
        except grpc.RpcError as err:
            code = err.code()
            if code not in (Code.FAILED_PRECONDITION, Code.INVALID_ARGUMENT):
                raise
    balances = [stack.balance(u, a) for u, a in zip(users, accounts, strict=True)]
    assert all(b >= 0 for b in balances)
    assert sum(balances) == 600
    with engine.connect() as conn:
        for acc, balance in zip(accounts, balances, strict=True):
            entries = conn.execute(
                sa.text(
                    "SELECT coalesce(sum(amount_minor), 0) FROM ledger_entries "
                    "WHERE account_id = :a"
                ),
                {"a": acc},
            ).scalar()
            assert entries == balance
        assert conn.execute(sa.text("SELECT sum(balance_minor) FROM accounts")).scalar() == 0
