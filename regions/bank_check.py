"""``meshbank check bank``: a Jepsen-style bank check against the running deployment.

1. A fresh partner (``bank-<tag>``, created with the operator use case like
   ``meshbank partners create``) opens N accounts through the global entry; the demo
   treasury funds each with the same opening balance, so they hold a fixed total.
2. Concurrent clients (regions/bank_clients.py) move random amounts between distinct
   random accounts, half over gRPC and half over REST, spread over the global entry's
   client locations, retrying retryable failures with the same request_id; a reader
   takes a snapshot of every balance (ListAccounts) every half second.
3. Meanwhile the nemesis (regions/nemesis.py) injects every enabled fault kind on a
   schedule and heals it; whatever happens (an error, Ctrl-C), every fault is healed.
4. After the faults are healed and replication is whole, the ledger is read from the
   database leader in ONE snapshot transaction (REPEATABLE READ, read only) and
   regions/bank_checker.py checks the history against it.

Because the partner is new, every transfer it initiated is one of ours: "no transfer
exists that was never requested" is checked over all of them, not a sample.
"""

from __future__ import annotations

import random
import time
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
import sqlalchemy as sa

from regions import drills, local, nemesis, public_client, replication
from regions.bank_checker import (
    Ledger,
    Outcome,
    ReadOp,
    StoredAccount,
    StoredEntry,
    StoredTransfer,
    TransferOp,
    Verdict,
    check,
)
from regions.bank_clients import BankClients, TokenSource
from regions.topology import Topology
from regions.workload import call_retrying
from services.common.validation import MAX_PAGE_SIZE

SCOPES = ("accounts.read", "accounts.write", "transfers.read", "transfers.write")


class CheckError(RuntimeError):
    """The check cannot run (bad options, no deployment, no leader, ...)."""


@dataclass(frozen=True)
class Options:
    duration: float = 60.0
    accounts: int = 8
    clients: int = 4
    faults: tuple[str, ...] = tuple(nemesis.FAULT_KINDS)
    opening_balance: int = 10_000
    # Up to a quarter of an opening balance: sometimes more than a drained account
    # holds, so definite refusals (insufficient funds) are part of the history too.
    max_amount: int = 2_500
    hold: float | None = None
    gap: float = 3.0
    seed: int | None = None
    recovery_timeout: float = 120.0

    def validate(self) -> None:
        problems = []
        if not 0 < self.duration <= 86_400:
            problems.append("--duration must be more than 0 and at most 86400 seconds")
        if not 2 <= self.accounts <= MAX_PAGE_SIZE:
            # One ListAccounts page is one snapshot: all accounts must fit in it.
            problems.append(f"--accounts must be between 2 and {MAX_PAGE_SIZE}")
        if not 1 <= self.clients <= 64:
            problems.append("--clients must be between 1 and 64")
        if self.hold is not None and not 0 <= self.hold <= 600:
            problems.append("--hold must be between 0 and 600 seconds")
        if not 0 < self.max_amount <= self.opening_balance:
            problems.append("the largest amount must be positive and at most the opening balance")
        unknown = [f for f in self.faults if f not in nemesis.FAULT_KINDS]
        if unknown:
            problems.append(f"unknown fault kind(s): {', '.join(unknown)}")
        if problems:
            raise CheckError("; ".join(problems))


@dataclass
class Report:
    tag: str
    seed: int
    accounts: list[str]
    total: int
    clients: int
    elapsed_s: float
    transfers: list[TransferOp]
    reads: list[ReadOp]
    faults: list[nemesis.FaultRecord]
    skipped: dict[str, str]
    verdict: Verdict
    notes: list[str] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        return not self.verdict.violations

    def as_dict(self) -> dict[str, Any]:
        ops = [t for t in self.transfers if t.protocol != "setup"]

        def counts(items: Sequence[TransferOp]) -> dict[str, int]:
            seen = Counter(t.outcome for t in items)
            return {
                "operations": len(items),
                "acked": seen[Outcome.OK],
                "failed": seen[Outcome.FAILED],
                "unknown": seen[Outcome.UNKNOWN],
            }

        by_status: dict[str, dict[str, int]] = {}
        for outcome in (Outcome.FAILED, Outcome.UNKNOWN):
            by_status[outcome.value] = dict(Counter(t.status for t in ops if t.outcome is outcome))
        reads_failed = Counter(r.status for r in self.reads if r.status != "OK")
        return {
            "tag": self.tag,
            "seed": self.seed,
            "elapsed_s": round(self.elapsed_s, 1),
            "accounts": len(self.accounts),
            "total": self.total,
            "clients": self.clients,
            **counts(ops),
            "unknown_applied": self.verdict.unknown_applied,
            "unknown_not_applied": self.verdict.unknown_not_applied,
            "by_protocol": {
                p: counts([t for t in ops if t.protocol == p]) for p in ("grpc", "rest")
            },
            "status_counts": by_status,
            "max_attempts": max((t.attempts for t in ops), default=0),
            "reads": {
                "ok": sum(1 for r in self.reads if r.status == "OK"),
                "failed": sum(reads_failed.values()),
                "failed_by_status": dict(reads_failed),
            },
            "faults": [f.as_dict() for f in self.faults],
            "skipped_faults": [{"kind": k, "reason": r} for k, r in self.skipped.items()],
            "violations": [v.as_dict() for v in self.verdict.violations],
            "valid": self.valid,
            "notes": self.notes,
        }


def summary(report: Report) -> str:
    """The human form of the report."""
    d = report.as_dict()
    lines = [
        f"bank check {d['tag']} (seed {d['seed']}): {d['elapsed_s']} s, {d['accounts']} accounts "
        f"holding {d['total']}, {d['clients']} clients",
        f"operations  {d['operations']}: acknowledged {d['acked']}, failed {d['failed']}, "
        f"unknown {d['unknown']} (applied {d['unknown_applied']}, "
        f"not applied {d['unknown_not_applied']})",
    ]
    for protocol, c in d["by_protocol"].items():
        lines.append(
            f"  {protocol:5} {c['operations']}: acknowledged {c['acked']}, failed {c['failed']}, "
            f"unknown {c['unknown']}"
        )
    for outcome, statuses in d["status_counts"].items():
        if statuses:
            lines.append(f"  {outcome} by last status: {statuses}")
    r = d["reads"]
    lines.append(
        f"snapshot reads  ok {r['ok']}, failed {r['failed']} {r['failed_by_status'] or ''}"
    )
    lines.append(f"faults  {len(d['faults'])} injected")
    for f in d["faults"]:
        span = (
            f"{f['injected_at']:7.1f}s .. healed {f['healed_at']}s, recovered {f['recovered_at']}s"
        )
        lines.append(f"  {f['kind']:16} {f['target'] or '-':18} {span} {f['error'] or ''}")
    for s in d["skipped_faults"]:
        lines.append(f"  {s['kind']:16} SKIPPED: {s['reason']}")
    for note in d["notes"]:
        lines.append(f"note  {note}")
    lines.append(f"violations  {len(d['violations'])}")
    lines += [f"  {v['kind']}: {v['detail']}" for v in d["violations"]]
    lines.append("verdict  " + ("VALID" if report.valid else "INVALID"))
    return "\n".join(lines)


LEDGER_SQL = {
    "accounts": """
        SELECT account_id::text, balance_minor, overdraft_limit_minor FROM accounts
        WHERE account_id = ANY(CAST(:ids AS uuid[]))""",
    "transfers": """
        SELECT transfer_id::text, request_id, initiated_by, source_account_id::text,
               destination_account_id::text, amount_minor, created_at
        FROM transfers
        WHERE source_account_id = ANY(CAST(:ids AS uuid[]))
           OR destination_account_id = ANY(CAST(:ids AS uuid[]))
           OR initiated_by = :principal""",
    "entries": """
        SELECT e.transfer_id::text, e.account_id::text, e.amount_minor
        FROM ledger_entries e JOIN transfers t ON t.transfer_id = e.transfer_id
        WHERE t.source_account_id = ANY(CAST(:ids AS uuid[]))
           OR t.destination_account_id = ANY(CAST(:ids AS uuid[]))
           OR t.initiated_by = :principal
           OR e.account_id = ANY(CAST(:ids AS uuid[]))""",
}


def read_ledger(url: str, accounts: Sequence[str], principal: str) -> Ledger:
    """Accounts, their transfers and those transfers' entries, all from one snapshot."""
    engine = sa.create_engine(url, isolation_level="REPEATABLE READ")
    params = {"ids": list(accounts), "principal": principal}
    try:
        with engine.connect() as conn:
            conn.execute(sa.text("SET TRANSACTION READ ONLY"))
            rows = {k: conn.execute(sa.text(q), params).all() for k, q in LEDGER_SQL.items()}
            conn.rollback()
    finally:
        engine.dispose()
    return Ledger(
        accounts={
            str(r[0]): StoredAccount(str(r[0]), int(r[1]), int(r[2])) for r in rows["accounts"]
        },
        transfers=[
            StoredTransfer(str(r[0]), str(r[1]), str(r[2]), str(r[3]), str(r[4]), int(r[5]), r[6])
            for r in rows["transfers"]
        ],
        entries=[StoredEntry(str(r[0]), str(r[1]), int(r[2])) for r in rows["entries"]],
    )


T = TypeVar("T")


def _setup_call(what: str, call: Callable[[], T], window: float = 120.0) -> T:
    """``call`` retried on retryable gRPC statuses: every setup call carries a fixed
    request_id (or only reads), so re-sending it replays rather than repeats, and a
    machine too busy to answer in time the first time is no reason to give up."""
    try:
        return call_retrying(call, window=window, max_delay=2.0)
    except grpc.RpcError as err:
        raise CheckError(f"{what} failed: {err.code().name}: {err.details()}") from err


def _read_ledger_from_leader(
    state: Path, topology: Topology, accounts: Sequence[str], principal: str, attempts: int = 5
) -> Ledger:
    """read_ledger on whichever member leads now, asked again if the connection fails
    (a leader that just lost its key, a busy machine)."""
    for attempt in range(attempts):
        try:
            return read_ledger(local.primary_url(state, topology), accounts, principal)
        except sa.exc.OperationalError as exc:
            if attempt == attempts - 1:
                raise CheckError(f"could not read the ledger from the leader: {exc}") from exc
            time.sleep(2.0)
    raise AssertionError("unreachable")


def _wait(predicate: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.5)
    return False


def run(
    state: Path,
    topology: Topology,
    options: Options,
    log: Callable[[str], None] = lambda _m: None,
) -> Report:
    options.validate()
    status = local.read_status(state)
    if not status or status.get("phase") != "running" or local.supervisor_pid(state) is None:
        raise CheckError("meshbank is not running: start it with `meshbank up --detach`")
    secret = local.load_secrets(state)
    seed = options.seed if options.seed is not None else random.SystemRandom().randrange(2**31)
    tag = f"bank-{uuid.uuid4().hex[:8]}"
    entry = status["endpoints"]["global_grpc"]
    from services import app  # imported late: the auth use cases pull in argon2 etc.

    # primary_url waits up to 30 s for a leader, and says so if there is none.
    creds = app.auth_admin(local.primary_url(state, topology)).create_partner(tag, SCOPES)
    principal = f"partners/{creds.client_id}"
    ca_file = public_client.ca_file(status)
    tokens = TokenSource(entry, ca_file, creds.client_id, creds.client_secret)
    treasury = secret["demo_treasury"]
    with public_client.grpc_channel(entry, ca_file) as channel:
        token = _setup_call("issuing the check's token", tokens.get)
        funder_token = _setup_call(
            "issuing the treasury's token", lambda: drills.partner_token(channel, secret)
        )
        accounts = _setup_call(
            "opening the accounts",
            lambda: drills.open_accounts(
                channel,
                token,
                treasury,
                tag,
                count=options.accounts,
                opening_balance=options.opening_balance,
                treasury_token=funder_token,
            ),
        )
    funder = f"partners/{secret['demo_client_id']}"
    # The funding transfers are part of the history: they touch the check's accounts.
    setup = [
        TransferOp(
            request_id=f"{tag}-fund-{n}",
            principal=funder,
            source=treasury,
            destination=account,
            amount=options.opening_balance,
            protocol="setup",
            started=0.0,
            finished=0.0,
            outcome=Outcome.OK,
            status="OK",
            attempts=1,
        )
        for n, account in enumerate(accounts)
    ]
    total = options.accounts * options.opening_balance
    log(f"{tag}: {options.accounts} accounts opened holding {total}; seed {seed}")

    t0 = time.monotonic()
    clients = BankClients(
        list(status["endpoints"]["global"].values()),
        tokens,
        principal,
        accounts,
        ca_file,
        clients=options.clients,
        max_amount=options.max_amount,
        seed=seed,
        t0=t0,
    )
    nem = nemesis.Nemesis(
        nemesis.FaultContext(state, topology, random.Random(seed)),  # noqa: S311 - targets
        list(options.faults),
        hold=options.hold,
        gap=options.gap,
        recovery_timeout=options.recovery_timeout,
        t0=t0,
        log=log,
    )
    clients.start()
    try:
        nem.run(until=options.duration)
        time.sleep(max(0.0, options.duration - (time.monotonic() - t0)))
    finally:
        nem.stop()
        nem.heal_all()
        log("faults healed; stopping the clients")
        clients.stop()
    elapsed = time.monotonic() - t0

    notes = []
    failed = [f.kind for f in nem.records if f.error is not None]
    if failed:
        notes.append(f"{len(failed)} fault(s) could not be injected: {', '.join(failed)}")
    if not _wait(lambda: nemesis.recovered(state, topology), options.recovery_timeout):
        notes.append("the deployment was not fully healthy again before the ledger was read")
    if not _wait(lambda: replication.replication_healthy(topology), options.recovery_timeout):
        notes.append("replication was not whole again before the ledger was read")
    ledger = _read_ledger_from_leader(state, topology, accounts, principal)
    verdict = check(accounts, setup + clients.transfers, clients.reads, ledger, total)
    return Report(
        tag=tag,
        seed=seed,
        accounts=accounts,
        total=total,
        clients=options.clients,
        elapsed_s=elapsed,
        transfers=setup + clients.transfers,
        reads=clients.reads,
        faults=nem.records,
        skipped=nem.skipped,
        verdict=verdict,
        notes=notes,
    )
