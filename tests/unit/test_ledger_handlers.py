"""The ledger use cases against the in-memory unit of work."""

from __future__ import annotations

import contextlib
import json
import uuid
from datetime import UTC, datetime, timedelta
from itertools import count

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from services.common import errors
from services.common.principal import ALL_SCOPES, USER_SCOPES, Principal, Scope
from services.ledger.handlers import LedgerService, MoveMoney, OpenAccount, RequestKey
from services.ledger.model import Account, Transfer
from tests.fakes.ledger import FakeRunner

ALICE = Principal("users/alice", USER_SCOPES)
BOB = Principal("users/bob", USER_SCOPES)
BANK = Principal("partners/bank", ALL_SCOPES)


def encode_account(a: Account) -> bytes:
    return json.dumps({"id": str(a.account_id), "balance": a.balance_minor}).encode()


def encode_transfer(t: Transfer) -> bytes:
    return json.dumps({"id": str(t.transfer_id), "amount": t.amount_minor}).encode()


def key(request_id: str, body: str = "same", method: str = "M") -> RequestKey:
    return RequestKey(request_id, method, body.encode())


class Ledger:
    """A LedgerService over fakes, with a ticking clock and helpers to set up accounts."""

    def __init__(self) -> None:
        self.runner = FakeRunner()
        ticks = count()
        start = datetime(2026, 1, 1, tzinfo=UTC)
        self.service = LedgerService(
            self.runner, clock=lambda: start + timedelta(seconds=next(ticks))
        )
        self._ids = count()

    def rid(self) -> str:
        return f"req-{next(self._ids)}"

    def open(self, who: Principal, currency: str = "USD", overdraft: int = 0) -> uuid.UUID:
        outcome = self.service.create_account(
            who,
            OpenAccount("", "acct", currency, overdraft),
            key(self.rid()),
            encode_account,
        )
        return uuid.UUID(json.loads(outcome.response)["id"])

    def treasury(self) -> uuid.UUID:
        return self.open(BANK, overdraft=10**12)

    def pay(
        self, who: Principal, src: uuid.UUID, dst: uuid.UUID, amount: int, request_id: str = ""
    ) -> dict[str, object]:
        outcome = self.service.create_transfer(
            who,
            MoveMoney(src, dst, amount, "USD", ""),
            key(request_id or self.rid(), f"{src}{dst}{amount}"),
            encode_transfer,
        )
        result: dict[str, object] = json.loads(outcome.response)
        return result

    def balance(self, account_id: uuid.UUID) -> int:
        return self.runner.state.accounts[account_id].balance_minor


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


def test_replayed_request_returns_original_response_and_moves_money_once(ledger: Ledger) -> None:
    bank, alice = ledger.treasury(), ledger.open(ALICE)
    first = ledger.pay(BANK, bank, alice, 700, request_id="fund-1")
    again = ledger.pay(BANK, bank, alice, 700, request_id="fund-1")
    assert first == again
    assert ledger.balance(alice) == 700
    assert len(ledger.runner.state.transfers) == 1


def test_same_request_id_with_a_different_request_is_rejected(ledger: Ledger) -> None:
    bank, alice = ledger.treasury(), ledger.open(ALICE)
    ledger.pay(BANK, bank, alice, 700, request_id="fund-1")
    with pytest.raises(errors.AlreadyExists) as exc:
        ledger.pay(BANK, bank, alice, 701, request_id="fund-1")
    assert exc.value.reason == "REQUEST_ID_REUSED"
    assert ledger.balance(alice) == 700


def test_a_replay_answers_as_the_first_call_even_when_the_request_would_now_be_refused(
    ledger: Ledger,
) -> None:
    # The effect runs before the key is looked up: a replay it refuses (alice has spent
    # the money since) must still answer with the stored response, and change nothing.
    bank, alice, bob = ledger.treasury(), ledger.open(ALICE), ledger.open(BOB)
    ledger.pay(BANK, bank, alice, 100)
    first = ledger.pay(ALICE, alice, bob, 100, request_id="all-of-it")
    again = ledger.pay(ALICE, alice, bob, 100, request_id="all-of-it")
    assert first == again
    assert (ledger.balance(alice), ledger.balance(bob)) == (0, 100)
    assert len(ledger.runner.state.transfers) == 2


def test_a_reused_request_id_is_rejected_even_when_the_other_request_would_be_refused(
    ledger: Ledger,
) -> None:
    bank, alice, bob = ledger.treasury(), ledger.open(ALICE), ledger.open(BOB)
    ledger.pay(BANK, bank, alice, 100)
    ledger.pay(ALICE, alice, bob, 100, request_id="r")
    with pytest.raises(errors.AlreadyExists) as exc:
        ledger.pay(ALICE, alice, bob, 5, request_id="r")  # alice has nothing left
    assert exc.value.reason == "REQUEST_ID_REUSED"


def test_a_replayed_account_opening_opens_no_second_account(ledger: Ledger) -> None:
    request = key("open-1")
    first = ledger.service.create_account(
        ALICE, OpenAccount("", "acct", "USD", 0), request, encode_account
    )
    again = ledger.service.create_account(
        ALICE, OpenAccount("", "acct", "USD", 0), request, encode_account
    )
    assert again.response == first.response
    assert again.replayed
    assert len(ledger.runner.state.accounts) == 1


def test_request_ids_are_scoped_per_principal(ledger: Ledger) -> None:
    bank, alice, bob = ledger.treasury(), ledger.open(ALICE), ledger.open(BOB)
    ledger.pay(BANK, bank, alice, 100, request_id="x")
    ledger.pay(ALICE, alice, bob, 40, request_id="x")
    assert (ledger.balance(alice), ledger.balance(bob)) == (60, 40)


def test_failed_transfer_changes_nothing_and_does_not_burn_the_request_id(ledger: Ledger) -> None:
    alice, bob = ledger.open(ALICE), ledger.open(BOB)
    with pytest.raises(errors.FailedPrecondition):
        ledger.pay(ALICE, alice, bob, 1, request_id="r")
    assert ("users/alice", "r") not in ledger.runner.state.keys
    bank = ledger.treasury()
    ledger.pay(BANK, bank, alice, 5)
    ledger.pay(ALICE, alice, bob, 1, request_id="r")
    assert ledger.balance(bob) == 1


def test_only_the_owner_debits_but_anyone_may_credit(ledger: Ledger) -> None:
    bank, alice, bob = ledger.treasury(), ledger.open(ALICE), ledger.open(BOB)
    ledger.pay(BANK, bank, alice, 100)
    with pytest.raises(errors.PermissionDenied) as exc:
        ledger.pay(BOB, alice, bob, 10)
    assert exc.value.reason == "NOT_ACCOUNT_OWNER"
    ledger.pay(ALICE, alice, bob, 10)
    assert ledger.balance(bob) == 10


def test_users_cannot_read_other_users_accounts(ledger: Ledger) -> None:
    alice = ledger.open(ALICE)
    assert ledger.service.get_account(ALICE, alice)[0].owner == "users/alice"
    with pytest.raises(errors.PermissionDenied):
        ledger.service.get_account(BOB, alice)
    with pytest.raises(errors.PermissionDenied):
        ledger.service.list_accounts(BOB, "users/alice", None, 10)
    with pytest.raises(errors.NotFound):
        ledger.service.get_account(ALICE, uuid.uuid4())


def test_scopes_limit_partners(ledger: Ledger) -> None:
    reader = Principal("partners/reader", frozenset({Scope.ACCOUNTS_READ.value}))
    with pytest.raises(errors.PermissionDenied) as exc:
        ledger.open(reader)
    assert exc.value.reason == "INSUFFICIENT_SCOPE"
    assert exc.value.metadata["required_scope"] == "accounts.write"


def test_overdraft_and_foreign_owner_need_admin_scope(ledger: Ledger) -> None:
    with pytest.raises(errors.PermissionDenied):
        ledger.open(ALICE, overdraft=10)
    with pytest.raises(errors.PermissionDenied):
        ledger.service.create_account(
            ALICE, OpenAccount("users/bob", "x", "USD", 0), key("k"), encode_account
        )
    outcome = ledger.service.create_account(
        BANK, OpenAccount("users/bob", "x", "USD", 0), key("k"), encode_account
    )
    created = uuid.UUID(json.loads(outcome.response)["id"])
    assert ledger.runner.state.accounts[created].owner == "users/bob"


def test_unknown_currency_is_an_invalid_argument(ledger: Ledger) -> None:
    with pytest.raises(errors.InvalidArgument) as exc:
        ledger.open(ALICE, currency="XTS")
    assert exc.value.violations[0].field == "currency_code"


def test_list_accounts_pages_through_everything_once(ledger: Ledger) -> None:
    opened = [ledger.open(ALICE) for _ in range(7)]
    seen: list[uuid.UUID] = []
    cursor = None
    while True:
        page = ledger.service.list_accounts(ALICE, "", cursor, 3)
        seen += [a.account_id for a in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == opened


def test_list_transfers_newest_first_across_pages(ledger: Ledger) -> None:
    bank, alice, bob = ledger.treasury(), ledger.open(ALICE), ledger.open(BOB)
    ledger.pay(BANK, bank, alice, 1000)
    made = [ledger.pay(ALICE, alice, bob, n)["id"] for n in range(1, 6)]
    seen: list[str] = []
    cursor = None
    while True:
        page = ledger.service.list_transfers(BOB, bob, cursor, 2)
        seen += [str(t.transfer_id) for t in page.items]
        cursor = page.next_cursor
        if cursor is None:
            break
    assert seen == list(reversed(made))


def test_close_account(ledger: Ledger) -> None:
    bank, alice = ledger.treasury(), ledger.open(ALICE)
    ledger.pay(BANK, bank, alice, 5)
    with pytest.raises(errors.FailedPrecondition):
        ledger.service.close_account(ALICE, alice, key("c1"), encode_account)
    bob = ledger.open(BOB)
    ledger.pay(ALICE, alice, bob, 5)
    ledger.service.close_account(ALICE, alice, key("c2"), encode_account)
    with pytest.raises(errors.FailedPrecondition) as exc:
        ledger.pay(BOB, bob, alice, 1)
    assert exc.value.reason == "ACCOUNT_CLOSED"


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(0, 3), st.integers(-5, 400)),
        max_size=40,
    )
)
def test_random_transfer_sequences_conserve_money_and_never_overdraw(
    moves: list[tuple[int, int, int]],
) -> None:
    ledger = Ledger()
    owners = [Principal(f"users/u{i}", USER_SCOPES) for i in range(4)]
    accounts = [ledger.open(p) for p in owners]
    bank = ledger.treasury()
    for a in accounts:
        ledger.pay(BANK, bank, a, 300)
    for src, dst, amount in moves:
        with contextlib.suppress(errors.FailedPrecondition, errors.InvalidArgument):
            ledger.pay(owners[src], accounts[src], accounts[dst], amount)
        assert all(ledger.balance(a) >= 0 for a in accounts)
    total = sum(a.balance_minor for a in ledger.runner.state.accounts.values())
    assert total == 0  # the treasury's negative balance mirrors what it issued
    assert sum(ledger.balance(a) for a in accounts) == 4 * 300
    for account_id, account in ledger.runner.state.accounts.items():
        entries = sum(
            e.amount_minor
            for t in ledger.runner.state.transfers.values()
            for e in t.entries
            if e.account_id == account_id
        )
        assert entries == account.balance_minor


class SlowReplica(FakeRunner):
    """A replica that is ``lag`` seconds behind and has not seen recent accounts."""

    def __init__(self, lag: float) -> None:
        super().__init__()
        self.lag = lag
        self.reads = 0

    def __call__(self, work, *, readonly=False):  # type: ignore[no-untyped-def]  # noqa: ARG002
        from tests.fakes.ledger import FakeUnitOfWork

        self.reads += 1
        return work(FakeUnitOfWork(self.state, staleness=self.lag))


def test_bounded_staleness_reads_use_a_fresh_enough_replica(ledger: Ledger) -> None:
    alice = ledger.open(ALICE)
    replica = SlowReplica(lag=0.4)
    replica.state = ledger.runner.state
    service = LedgerService(ledger.runner, read_replica=replica)
    account, staleness = service.get_account(ALICE, alice, max_staleness=1.0)
    assert (account.account_id, staleness, replica.reads) == (alice, 0.4, 1)
    # Too stale for the caller: the primary answers, with staleness 0.
    account, staleness = service.get_account(ALICE, alice, max_staleness=0.1)
    assert (staleness, replica.reads) == (0.0, 2)
    # Strong reads never touch the replica.
    service.get_account(ALICE, alice)
    assert replica.reads == 2
