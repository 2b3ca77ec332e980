"""The bank check's verdict: a client history against the ledger as stored, nothing else.

Pure functions over plain data so that a unit test can hand it a crafted history and
ledger with each kind of anomaly (tests/unit/test_bank_checker.py): the checker is
only worth something if it demonstrably fails. regions/bank_check.py records the
history against the running system and reads the ledger from the database leader.

What a client saw:

* ``TransferOp``: one transfer, as many attempts as it took with the SAME request_id,
  and its outcome: ``ok`` (acknowledged), ``failed`` (a definite refusal, e.g.
  FAILED_PRECONDITION for insufficient funds) or ``unknown`` (the client gave up on a
  retryable error: it may or may not have been applied).
* ``ReadOp``: one snapshot read of every account's balance.

What the ledger holds (read in one snapshot transaction on the leader): the accounts'
stored balances and overdraft limits, every transfer touching them, and every entry
of those transfers.
"""

from __future__ import annotations

import itertools
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    UNKNOWN = "unknown"


# Refusals decided inside the ledger transaction, after the request_id lookup: if an
# earlier attempt with the same request_id had been applied, this attempt would have
# replayed its response instead. So even after an ambiguous attempt they are definite.
DECIDED_IN_LEDGER = frozenset({"FAILED_PRECONDITION", "ALREADY_EXISTS", "NOT_FOUND"})


def classify(statuses: Sequence[str], retryable: Iterable[str]) -> Outcome:
    """The outcome of one transfer from the status of each attempt (the last one last).

    ``OK`` anywhere last is acknowledged. Giving up on a retryable status is unknown.
    A non-retryable refusal is definite if no earlier attempt was ambiguous, or if the
    ledger itself decided it (see DECIDED_IN_LEDGER); otherwise (say UNAUTHENTICATED
    after a timeout) the earlier attempt may still have been applied: unknown.
    """
    if not statuses:
        raise ValueError("a transfer has at least one attempt")
    retry = frozenset(retryable)
    last = statuses[-1]
    if last == "OK":
        return Outcome.OK
    if last in retry:
        return Outcome.UNKNOWN
    ambiguous_before = any(s in retry for s in statuses[:-1])
    if ambiguous_before and last not in DECIDED_IN_LEDGER:
        return Outcome.UNKNOWN
    return Outcome.FAILED


@dataclass(frozen=True)
class TransferOp:
    request_id: str
    principal: str
    source: str
    destination: str
    amount: int
    protocol: str  # grpc | rest | setup
    started: float  # seconds since the run started
    finished: float
    outcome: Outcome
    status: str  # the last attempt's status: OK, FAILED_PRECONDITION, UNAVAILABLE, ...
    attempts: int


@dataclass(frozen=True)
class ReadOp:
    protocol: str
    started: float
    finished: float
    status: str
    balances: dict[str, int] | None = None  # account_id -> balance, when status is OK


@dataclass(frozen=True)
class StoredAccount:
    account_id: str
    balance: int
    overdraft_limit: int


@dataclass(frozen=True)
class StoredTransfer:
    transfer_id: str
    request_id: str
    initiated_by: str
    source: str
    destination: str
    amount: int
    created_at: datetime


@dataclass(frozen=True)
class StoredEntry:
    transfer_id: str
    account_id: str
    amount: int


@dataclass(frozen=True)
class Ledger:
    accounts: dict[str, StoredAccount]
    transfers: list[StoredTransfer]
    entries: list[StoredEntry]


@dataclass(frozen=True)
class Violation:
    kind: str
    detail: str

    def as_dict(self) -> dict[str, str]:
        return asdict(self)


# Every kind the checker can report, with what it means (shown by --help and the docs).
KINDS = {
    "read-total": "a snapshot read whose balances do not sum to the total",
    "read-accounts": "a snapshot read that did not return exactly the check's accounts",
    "negative-balance": "a balance below -overdraft_limit, in a read, stored, or at any "
    "point of the account's entry history",
    "lost": "an acknowledged transfer that is not in the ledger",
    "duplicated": "a request_id (per principal) that the ledger holds more than once",
    "unrequested": "a transfer in the ledger that no client ever sent",
    "mismatch": "a stored transfer whose accounts or amount differ from the request",
    "failed-applied": "a transfer refused definitely that the ledger holds anyway",
    "missing-account": "an account of the check that the ledger does not hold",
    "balance-entries": "a stored balance that differs from the sum of its entries",
    "unbalanced": "a transfer whose entries do not move its amount from source to "
    "destination (two entries summing to zero)",
    "final-total": "stored balances that do not sum to the total",
}


@dataclass
class Verdict:
    violations: list[Violation] = field(default_factory=list)
    unknown_applied: int = 0
    unknown_not_applied: int = 0

    def add(self, kind: str, detail: str) -> None:
        if kind not in KINDS:  # a programming error, not input
            raise ValueError(f"unknown violation kind {kind!r}")
        self.violations.append(Violation(kind, detail))

    def as_dict(self) -> dict[str, Any]:
        return {
            "violations": [v.as_dict() for v in self.violations],
            "unknown_applied": self.unknown_applied,
            "unknown_not_applied": self.unknown_not_applied,
        }


def check(
    accounts: Sequence[str],
    history: Sequence[TransferOp],
    reads: Sequence[ReadOp],
    ledger: Ledger,
    total: int,
) -> Verdict:
    """Every rule of the bank check over the check's ``accounts`` holding ``total``;
    each broken rule is one Violation (details capped)."""
    verdict = Verdict()
    limits = {
        a: ledger.accounts[a].overdraft_limit if a in ledger.accounts else 0 for a in accounts
    }
    _check_reads(verdict, reads, limits, total)
    _check_transfers(verdict, history, ledger)
    _check_balances(verdict, ledger, total, accounts)
    return verdict


def _capped(verdict: Verdict, kind: str, details: list[str], limit: int = 5) -> None:
    """One violation per instance up to ``limit``, then one summarising the rest."""
    for detail in details[:limit]:
        verdict.add(kind, detail)
    if len(details) > limit:
        verdict.add(kind, f"... and {len(details) - limit} more")


def _check_reads(
    verdict: Verdict, reads: Sequence[ReadOp], limits: dict[str, int], total: int
) -> None:
    expected = set(limits)
    bad_total, bad_accounts, negative = [], [], []
    for read in reads:
        if read.status != "OK" or read.balances is None:
            continue
        at = f"{read.protocol} read at {read.started:.3f}s"
        if set(read.balances) != expected:
            missing = len(expected - set(read.balances))
            extra = len(set(read.balances) - expected)
            bad_accounts.append(f"{at}: {missing} account(s) missing, {extra} unexpected")
            continue
        seen = sum(read.balances.values())
        if seen != total:
            bad_total.append(f"{at} summed to {seen}, not {total}")
        negative += [f"{at}: {a} = {b}" for a, b in sorted(read.balances.items()) if b < -limits[a]]
    _capped(verdict, "read-accounts", bad_accounts)
    _capped(verdict, "read-total", bad_total)
    _capped(verdict, "negative-balance", negative)


def _check_transfers(verdict: Verdict, history: Sequence[TransferOp], ledger: Ledger) -> None:
    requested = {(op.principal, op.request_id): op for op in history}
    stored: dict[tuple[str, str], list[StoredTransfer]] = defaultdict(list)
    for t in ledger.transfers:
        stored[(t.initiated_by, t.request_id)].append(t)

    lost, failed_applied, duplicated, mismatched, unrequested = [], [], [], [], []
    for key, op in requested.items():
        found = stored.get(key, [])
        if op.outcome is Outcome.OK and not found:
            lost.append(f"{op.request_id} ({op.protocol}, acknowledged at {op.finished:.3f}s)")
        elif op.outcome is Outcome.FAILED and found:
            failed_applied.append(f"{op.request_id} ({op.protocol}, refused with {op.status})")
        elif op.outcome is Outcome.UNKNOWN:
            if found:
                verdict.unknown_applied += 1
            else:
                verdict.unknown_not_applied += 1
        for t in found:
            if (t.source, t.destination, t.amount) != (op.source, op.destination, op.amount):
                mismatched.append(
                    f"{op.request_id}: stored {t.source}->{t.destination} {t.amount}, "
                    f"requested {op.source}->{op.destination} {op.amount}"
                )
    for key, found in stored.items():
        if len(found) > 1:
            duplicated.append(f"{key[1]} by {key[0]} stored {len(found)} times")
        if key not in requested:
            unrequested += [f"{t.transfer_id} (request_id {key[1]} by {key[0]})" for t in found]
    _capped(verdict, "lost", lost)
    _capped(verdict, "failed-applied", failed_applied)
    _capped(verdict, "duplicated", duplicated)
    _capped(verdict, "mismatch", mismatched)
    _capped(verdict, "unrequested", unrequested)


def _check_balances(verdict: Verdict, ledger: Ledger, total: int, accounts: Sequence[str]) -> None:
    missing = [a for a in accounts if a not in ledger.accounts]
    _capped(verdict, "missing-account", missing)

    by_transfer: dict[str, list[StoredEntry]] = defaultdict(list)
    for e in ledger.entries:
        by_transfer[e.transfer_id].append(e)
    unbalanced = []
    for t in ledger.transfers:
        got = Counter((e.account_id, e.amount) for e in by_transfer.get(t.transfer_id, []))
        if got != Counter({(t.source, -t.amount): 1, (t.destination, t.amount): 1}):
            unbalanced.append(f"{t.transfer_id}: entries {sorted(got.elements())}")
    _capped(verdict, "unbalanced", unbalanced)

    entry_sums: Counter[str] = Counter()
    for e in ledger.entries:
        entry_sums[e.account_id] += e.amount
    differs = [
        f"{a.account_id}: stored {a.balance}, entries sum to {entry_sums[a.account_id]}"
        for a in ledger.accounts.values()
        if a.balance != entry_sums[a.account_id]
    ]
    _capped(verdict, "balance-entries", differs)
    negative = [
        f"{a.account_id}: stored {a.balance} (overdraft limit {a.overdraft_limit})"
        for a in ledger.accounts.values()
        if a.balance < -a.overdraft_limit
    ]
    negative += _negative_in_history(ledger)
    _capped(verdict, "negative-balance", negative)

    stored_total = sum(a.balance for a in ledger.accounts.values())
    if stored_total != total:
        verdict.add("final-total", f"stored balances sum to {stored_total}, not {total}")


def _negative_in_history(ledger: Ledger) -> list[str]:
    """Replay each account's entries in commit order and report any prefix below the limit.

    A transfer locks both accounts (SELECT ... FOR UPDATE) before it reads the clock for
    ``created_at``, and holds the locks until it commits, so per account ``created_at``
    order is commit order (all instances share this machine's clock). Ties, possible at
    microsecond resolution, are replayed credits first: the most lenient order, so any
    dip reported is real.
    """
    created = {t.transfer_id: t.created_at for t in ledger.transfers}
    per_account: dict[str, list[StoredEntry]] = defaultdict(list)
    for e in ledger.entries:
        if e.account_id in ledger.accounts and e.transfer_id in created:
            per_account[e.account_id].append(e)
    found = []
    for account_id, entries in per_account.items():
        limit = ledger.accounts[account_id].overdraft_limit
        entries.sort(key=lambda e: (created[e.transfer_id], -e.amount))
        running = list(itertools.accumulate(e.amount for e in entries))
        lowest = min(running, default=0)
        if lowest < -limit:
            at = entries[running.index(lowest)].transfer_id
            found.append(f"{account_id}: fell to {lowest} after transfer {at} (limit {limit})")
    return found
