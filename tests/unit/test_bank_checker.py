"""The bank checker on crafted histories: quiet on a consistent one, and one test per
kind of anomaly it must catch (a checker that cannot fail proves nothing)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from regions.bank_checker import (
    KINDS,
    Ledger,
    Outcome,
    ReadOp,
    StoredAccount,
    StoredEntry,
    StoredTransfer,
    TransferOp,
    Verdict,
    check,
    classify,
)
from regions.bank_clients import RETRYABLE_STATUSES, rest_status

ME = "partners/mbp_check"
FUNDER = "partners/mbp_demo"
TREASURY = "treasury"
A, B, C = "acct-a", "acct-b", "acct-c"
OPENING = 100
TOTAL = 3 * OPENING
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def op(
    request_id: str,
    source: str,
    destination: str,
    amount: int,
    outcome: Outcome = Outcome.OK,
    principal: str = ME,
    protocol: str = "grpc",
    status: str = "OK",
) -> TransferOp:
    return TransferOp(
        request_id, principal, source, destination, amount, protocol, 1.0, 1.5, outcome, status, 1
    )


def stored(n: int, t: TransferOp) -> StoredTransfer:
    return StoredTransfer(
        f"tr-{n}",
        t.request_id,
        t.principal,
        t.source,
        t.destination,
        t.amount,
        T0 + timedelta(seconds=n),
    )


def entries(t: StoredTransfer) -> list[StoredEntry]:
    return [
        StoredEntry(t.transfer_id, t.source, -t.amount),
        StoredEntry(t.transfer_id, t.destination, t.amount),
    ]


def consistent() -> tuple[list[TransferOp], list[ReadOp], Ledger]:
    """Three funded accounts, two applied transfers, one refusal, one unknown that was
    applied and one unknown that was not; two snapshot reads."""
    history = [
        op(f"fund-{a}", TREASURY, a, OPENING, principal=FUNDER, protocol="setup") for a in (A, B, C)
    ]
    history += [
        op("t1", A, B, 30),
        op("t2", B, C, 50, protocol="rest"),
        op("t3", C, A, 500, Outcome.FAILED, status="FAILED_PRECONDITION"),
        op("t4", C, A, 10, Outcome.UNKNOWN, status="UNAVAILABLE"),
        op("t5", A, C, 5, Outcome.UNKNOWN, status="HTTP 503", protocol="rest"),
    ]
    applied = [h for h in history if h.request_id not in ("t3", "t5")]
    transfers = [stored(n, t) for n, t in enumerate(applied)]
    balances = {A: OPENING - 30 + 10, B: OPENING + 30 - 50, C: OPENING + 50 - 10}
    ledger = Ledger(
        accounts={a: StoredAccount(a, b, 0) for a, b in balances.items()},
        transfers=transfers,
        entries=[e for t in transfers for e in entries(t)],
    )
    reads = [
        ReadOp("grpc", 2.0, 2.1, "OK", {A: OPENING, B: OPENING, C: OPENING}),
        ReadOp("rest", 3.0, 3.1, "OK", dict(balances)),
        ReadOp("rest", 4.0, 4.1, "UNAVAILABLE", None),
    ]
    return history, reads, ledger


def verdict(
    history: list[TransferOp], reads: list[ReadOp], ledger: Ledger, total: int = TOTAL
) -> Verdict:
    return check([A, B, C], history, reads, ledger, total)


def kinds(v: Verdict) -> set[str]:
    return {x.kind for x in v.violations}


def test_a_consistent_history_has_no_violation_and_resolves_unknowns() -> None:
    result = verdict(*consistent())
    assert result.violations == []
    assert (result.unknown_applied, result.unknown_not_applied) == (1, 1)


def test_a_read_that_does_not_sum_to_the_total() -> None:
    history, reads, ledger = consistent()
    reads.append(ReadOp("grpc", 5.0, 5.1, "OK", {A: OPENING, B: OPENING, C: OPENING + 1}))
    assert kinds(verdict(history, reads, ledger)) == {"read-total"}


def test_a_read_missing_an_account() -> None:
    history, reads, ledger = consistent()
    reads.append(ReadOp("rest", 5.0, 5.1, "OK", {A: 2 * OPENING, B: OPENING}))
    assert kinds(verdict(history, reads, ledger)) == {"read-accounts"}


def test_a_read_with_a_negative_balance() -> None:
    history, reads, ledger = consistent()
    reads.append(ReadOp("grpc", 5.0, 5.1, "OK", {A: -10, B: 2 * OPENING + 10, C: OPENING}))
    assert kinds(verdict(history, reads, ledger)) == {"negative-balance"}


def test_an_acknowledged_transfer_missing_from_the_ledger() -> None:
    history, reads, ledger = consistent()
    history.append(op("t6", B, A, 1))
    assert kinds(verdict(history, reads, ledger)) == {"lost"}


def test_a_transfer_applied_twice() -> None:
    history, reads, ledger = consistent()
    t1 = next(t for t in ledger.transfers if t.request_id == "t1")
    again = replace(t1, transfer_id="tr-again", created_at=T0 + timedelta(seconds=60))
    ledger.transfers.append(again)
    ledger.entries.extend(entries(again))
    balances = dict(ledger.accounts)
    balances[A] = replace(balances[A], balance=balances[A].balance - 30)
    balances[B] = replace(balances[B], balance=balances[B].balance + 30)
    ledger = replace(ledger, accounts=balances)
    assert kinds(verdict(history, reads, ledger)) == {"duplicated"}


def test_a_transfer_nobody_requested() -> None:
    history, reads, ledger = consistent()
    ghost = StoredTransfer("tr-ghost", "ghost", ME, B, A, 1, T0 + timedelta(seconds=60))
    ledger.transfers.append(ghost)
    ledger.entries.extend(entries(ghost))
    balances = dict(ledger.accounts)
    balances[A] = replace(balances[A], balance=balances[A].balance + 1)
    balances[B] = replace(balances[B], balance=balances[B].balance - 1)
    ledger = replace(ledger, accounts=balances)
    assert kinds(verdict(history, reads, ledger)) == {"unrequested"}


def test_the_same_request_id_from_another_principal_is_not_ours() -> None:
    history, reads, ledger = consistent()
    ledger.transfers[-1] = replace(ledger.transfers[-1], initiated_by="partners/someone-else")
    assert "unrequested" in kinds(verdict(history, reads, ledger))


def test_a_stored_transfer_that_differs_from_the_request() -> None:
    history, reads, ledger = consistent()
    history = [replace(h, amount=31) if h.request_id == "t1" else h for h in history]
    assert kinds(verdict(history, reads, ledger)) == {"mismatch"}


def test_a_refused_transfer_that_was_applied() -> None:
    history, reads, ledger = consistent()
    history = [
        replace(h, outcome=Outcome.FAILED, status="FAILED_PRECONDITION")
        if h.request_id == "t2"
        else h
        for h in history
    ]
    assert kinds(verdict(history, reads, ledger)) == {"failed-applied"}


def test_an_account_missing_from_the_ledger() -> None:
    history, reads, ledger = consistent()
    accounts = {k: v for k, v in ledger.accounts.items() if k != C}
    result = verdict(history, reads, replace(ledger, accounts=accounts))
    assert "missing-account" in kinds(result)


def test_a_stored_balance_that_is_not_its_entry_sum() -> None:
    history, reads, ledger = consistent()
    accounts = dict(ledger.accounts)
    accounts[A] = replace(accounts[A], balance=accounts[A].balance + 5)
    accounts[B] = replace(accounts[B], balance=accounts[B].balance - 5)
    assert kinds(verdict(history, reads, replace(ledger, accounts=accounts))) == {"balance-entries"}


def test_a_transfer_whose_entries_do_not_balance() -> None:
    history, reads, ledger = consistent()
    first = ledger.transfers[-1]
    ledger.entries[:] = [
        replace(e, amount=e.amount + 1)
        if e.transfer_id == first.transfer_id and e.amount > 0
        else e
        for e in ledger.entries
    ]
    assert "unbalanced" in kinds(verdict(history, reads, ledger))


def test_stored_balances_that_do_not_sum_to_the_total() -> None:
    history, reads, ledger = consistent()
    failed_reads = [r for r in reads if r.status != "OK"]  # the others would not sum either
    assert kinds(verdict(history, failed_reads, ledger, total=TOTAL + 1)) == {"final-total"}


def test_a_balance_that_dipped_below_zero_in_between() -> None:
    """Final balances fine, but replayed in commit order A went to -20 for a moment."""
    history, reads, ledger = consistent()
    drain = op("t7", A, B, 100)
    refill = op("t8", B, A, 100)
    history += [drain, refill]
    for n, t in ((90, drain), (91, refill)):
        s = stored(n, t)
        ledger.transfers.append(s)
        ledger.entries.extend(entries(s))
    result = verdict(history, reads, ledger)
    assert kinds(result) == {"negative-balance"}
    assert "fell to -20" in result.violations[0].detail


def test_an_overdraft_limit_allows_a_negative_balance() -> None:
    history, reads, ledger = consistent()
    drain = op("t7", A, B, 100)
    refill = op("t8", B, A, 100)
    history += [drain, refill]
    for n, t in ((90, drain), (91, refill)):
        s = stored(n, t)
        ledger.transfers.append(s)
        ledger.entries.extend(entries(s))
    accounts = dict(ledger.accounts)
    accounts[A] = replace(accounts[A], overdraft_limit=20)
    assert verdict(history, reads, replace(ledger, accounts=accounts)).violations == []


def test_every_kind_is_covered_by_a_test_above() -> None:
    tested = {
        "read-total",
        "read-accounts",
        "negative-balance",
        "lost",
        "duplicated",
        "unrequested",
        "mismatch",
        "failed-applied",
        "missing-account",
        "balance-entries",
        "unbalanced",
        "final-total",
    }
    assert tested == set(KINDS)


@pytest.mark.parametrize(
    ("statuses", "expected"),
    [
        (["OK"], Outcome.OK),
        (["UNAVAILABLE", "DEADLINE_EXCEEDED", "OK"], Outcome.OK),
        (["FAILED_PRECONDITION"], Outcome.FAILED),
        (["UNAVAILABLE"] * 3, Outcome.UNKNOWN),
        (["HTTP 503", "CONNECTION"], Outcome.UNKNOWN),
        # The ledger refused after looking the request_id up: the earlier try did nothing.
        (["DEADLINE_EXCEEDED", "FAILED_PRECONDITION"], Outcome.FAILED),
        # Refused before the ledger: the earlier (timed out) try may have been applied.
        (["DEADLINE_EXCEEDED", "UNAUTHENTICATED"], Outcome.UNKNOWN),
        (["UNAUTHENTICATED"], Outcome.FAILED),
    ],
)
def test_classify(statuses: list[str], expected: Outcome) -> None:
    assert classify(statuses, RETRYABLE_STATUSES) is expected


def test_classify_needs_an_attempt() -> None:
    with pytest.raises(ValueError, match="at least one attempt"):
        classify([], RETRYABLE_STATUSES)


@pytest.mark.parametrize(
    ("http_status", "body", "expected"),
    [
        (200, b"{}", "OK"),
        (400, b'{"code":9,"message":"insufficient funds","details":[]}', "FAILED_PRECONDITION"),
        (503, b'{"code":14,"message":"unavailable"}', "UNAVAILABLE"),
        (503, b"no healthy upstream", "HTTP 503"),
        (504, b"upstream request timeout", "HTTP 504"),
        (500, b'{"code":"nope"}', "HTTP 500"),
        (502, b"[1, 2]", "HTTP 502"),
    ],
)
def test_rest_status(http_status: int, body: bytes, expected: str) -> None:
    assert rest_status(http_status, body) == expected
