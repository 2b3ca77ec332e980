"""Failover drills against the running local deployment (`meshbank drill NAME`).

Each drill opens a few accounts of its own, runs a transfer + read workload through the
global entry, injects one fault, lifts it, waits for replication to be whole again and
then audits the ledger itself: every acknowledged transfer present exactly once, the
drill's accounts holding the same total, every balance equal to its entries.

Faults (all on the region that holds the database leader, the worst case):

* ``db-leader-kill``  SIGKILL the leader's Patroni and PostgreSQL, keep them down a while.
* ``region-kill``     SIGKILL every process of the leader's region (services, sidecars,
                      edge, Patroni + PostgreSQL, etcd), keep them down a while.
* ``leader-pause``    SIGSTOP the leader's Patroni and PostgreSQL processes (longer than
                      the leader key's ttl), then SIGCONT: the old leader must not
                      accept a write after a new one was elected.
* ``region-partition`` cut the leader's region off from the other regions (iptables DROP
                      both ways inside its network namespace; netns deployments only),
                      then heal. Everything in it keeps running and the clients (root
                      namespace, like GeoDNS) still reach its edge: its etcd member
                      loses quorum, its Patroni demotes PostgreSQL (no DCS), and its
                      commits could not have been acknowledged meanwhile because the
                      synchronous standby is on the other side. The other two regions
                      elect a new leader; writes reach it when the global entry and
                      the edges retry in the next region (see docs/runbook.md).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
import sqlalchemy as sa

from meshbank.account.v1 import account_pb2, account_pb2_grpc
from meshbank.auth.v1 import auth_pb2, auth_pb2_grpc
from meshbank.transfer.v1 import transfer_pb2, transfer_pb2_grpc
from regions import local, public_client, replication
from regions.topology import Topology
from regions.workload import Workload, longest_gap, outage_after
from services.ledger import invariants

DRILLS = ("db-leader-kill", "region-kill", "leader-pause", "region-partition")
ACCOUNTS = 4
NEEDS_NETNS = (
    "region-partition needs regions in network namespaces: run "
    "`MESHBANK_NETNS=1 meshbank up --detach` as root (regions/netns.py)"
)
OPENING_BALANCE = 1_000_000


class DrillError(RuntimeError):
    """The drill could not run (no deployment, no leader, ...)."""


@dataclass
class DrillResult:
    drill: str
    write_outage_s: float
    read_outage_s: float
    acked: int
    lost: int
    duplicated: int
    conserved: bool
    replication_restored: bool
    failed: int = 0
    reads_ok: int = 0
    reads_failed: int = 0
    leader_before: str | None = None
    leader_after: str | None = None
    fault_at_s: float = 0.0
    fault_lifted_at_s: float = 0.0
    clients_in: str | None = None
    # Seen from the root namespace by polling every member's /primary during the drill:
    # the old leader's last "I am the primary" after the fault, the first answer of
    # another member, and whether two members ever claimed to be primary in one round.
    old_leader_primary_until_s: float | None = None
    new_leader_after_s: float | None = None
    primaries_overlap: bool = False
    # When the new leader first named a synchronous standby again: until then its
    # commits are on one region only (non-strict synchronous_mode accepts them).
    sync_standby_after_s: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return (
            self.lost == 0 and self.duplicated == 0 and self.conserved and self.replication_restored
        )

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("write_outage_s", "read_outage_s", "fault_at_s", "fault_lifted_at_s"):
            data[key] = round(data[key], 3) if data[key] != float("inf") else None
        for key in ("old_leader_primary_until_s", "new_leader_after_s", "sync_standby_after_s"):
            data[key] = None if data[key] is None else round(data[key], 3)
        return data


def partner_token(channel: grpc.Channel, secret: dict[str, str]) -> str:
    reply = auth_pb2_grpc.AuthServiceStub(channel).IssueClientToken(
        auth_pb2.IssueClientTokenRequest(
            client_id=secret["demo_client_id"], client_secret=secret["demo_client_secret"]
        ),
        timeout=10,
    )
    return str(reply.access_token)


def open_accounts(
    channel: grpc.Channel,
    token: str,
    treasury: str,
    tag: str,
    *,
    count: int = ACCOUNTS,
    opening_balance: int = OPENING_BALANCE,
    treasury_token: str | None = None,
) -> list[str]:
    """Open ``count`` accounts owned by ``token``'s principal, each funded from the
    treasury (owned by ``treasury_token``'s, by default the same), with request_ids
    ``{tag}-open-{n}`` and ``{tag}-fund-{n}``."""
    md = (("authorization", f"Bearer {token}"),)
    funder = (("authorization", f"Bearer {treasury_token or token}"),)
    return [
        open_funded_account(channel, md, funder, treasury, tag, n, opening_balance)
        for n in range(count)
    ]


Metadata = tuple[tuple[str, str], ...]


def open_funded_account(
    channel: grpc.Channel,
    md: Metadata,
    funder: Metadata,
    treasury: str,
    tag: str,
    n: int,
    opening_balance: int,
    timeout: float = 20,
) -> str:
    """Open account ``n`` of ``tag`` (request_id ``{tag}-open-{n}``) as ``md``'s principal
    and fund it from ``treasury`` as ``funder``'s (``{tag}-fund-{n}``): safe to repeat."""
    reply = account_pb2_grpc.AccountServiceStub(channel).CreateAccount(
        account_pb2.CreateAccountRequest(
            request_id=f"{tag}-open-{n}", display_name=f"{tag} {n}", currency_code="USD"
        ),
        metadata=md,
        timeout=timeout,
    )
    transfer_pb2_grpc.TransferServiceStub(channel).CreateTransfer(
        transfer_pb2.CreateTransferRequest(
            request_id=f"{tag}-fund-{n}",
            source_account_id=treasury,
            destination_account_id=reply.account.account_id,
            amount_minor=opening_balance,
            currency_code="USD",
        ),
        metadata=funder,
        timeout=timeout,
    )
    return str(reply.account.account_id)


def process_tree(*roots: int) -> list[int]:
    """``roots`` and all their descendants (PostgreSQL's backends, walsenders, ...),
    from one reading of ``/proc``."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        fields = local.proc_stat(int(entry.name))
        if fields is None:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], list(roots)
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def _patroni_pid(state: Path, region: str) -> int | None:
    status = local.read_status(state) or {"processes": []}
    for proc in status["processes"]:
        if proc["region"] == region and proc["role"] == "db" and proc.get("pid"):
            return int(proc["pid"])
    return None


class Fault:
    """Inject with ``start()``; lift with ``stop()``."""

    def __init__(self, name: str, state: Path, region: str) -> None:
        self.name = name
        self.state = state
        self.region = region
        self._paused: list[int] = []
        self._network = local.read_network(state)
        if name == "region-partition" and self._network is None:
            raise DrillError(NEEDS_NETNS)

    def start(self) -> float:
        """Inject the fault; returns when it landed (``time.monotonic()`` just before the
        first signal or rule), which is when the drill's outages start."""
        landed = time.monotonic()
        if self.name == "db-leader-kill":
            local.kill_region(self.state, self.region, ["db"])
        elif self.name == "region-kill":
            local.kill_region(self.state, self.region, [r for r in local.ROLES if r != "global"])
        elif self.name == "leader-pause":
            self._paused, landed = self._pause_leader()
        elif self.name == "region-partition" and self._network is not None:
            self._network.partition(self.region)
        else:
            raise DrillError(f"unknown drill {self.name!r}; known: {', '.join(DRILLS)}")
        return landed

    def _pause_leader(self) -> tuple[list[int], float]:
        """SIGSTOP the region's Patroni and PostgreSQL, every process of both; returns the
        paused PIDs and the time of the first SIGSTOP.

        The trees are listed before the first signal, so that every process stops
        within a few ``kill()`` calls: listing ``/proc`` takes 0.1 s on a loaded machine,
        and backends left running that long served writes (a drill measured a 0.10 s
        "outage" that way). The roots go first: a running postmaster forks a backend for
        every new connection, and a backend forked after the list was read would go on
        serving writes (0.44 s in an earlier drill). Then the trees are listed again,
        and again, until a listing finds nothing new.
        """
        patroni = _patroni_pid(self.state, self.region)
        postmaster = replication.postmaster_pid(self.state / "db" / self.region)
        if patroni is None or postmaster is None or not local.pid_alive(postmaster):
            raise DrillError(
                f"{self.region} has no running Patroni and PostgreSQL to pause "
                f"(Patroni pid {patroni}, postmaster pid {postmaster})"
            )
        paused: list[int] = []
        tree = set(process_tree(postmaster, patroni))
        todo = [postmaster, patroni, *sorted(tree.difference((postmaster, patroni)))]
        landed = time.monotonic()
        for _ in range(10):
            for pid in todo:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGSTOP)
                paused.append(pid)
            todo = sorted(set(process_tree(postmaster, patroni)).difference(paused))
            if not todo:
                return paused, landed
        raise DrillError(f"{self.region}'s processes kept forking while being paused")

    def stop(self) -> None:
        if self.name == "leader-pause":
            for pid in self._paused:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        elif self.name == "region-partition" and self._network is not None:
            self._network.heal(self.region)
        else:
            local.restore_region(self.state, self.region)


class LeaderWatch:
    """Polls every member's Patroni ``/primary`` (4 rounds a second) from the fault on."""

    def __init__(self, topology: Topology, old_leader: str, fault_at: float) -> None:
        self.topology = topology
        self.old_leader = old_leader
        self.fault_at = fault_at
        self.old_primary_until: float | None = None
        self.new_leader_after: float | None = None
        self.new_leader: str | None = None
        self.sync_after: float | None = None
        self.overlap = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _loop(self) -> None:
        while not self._stop.is_set():
            now = time.monotonic() - self.fault_at
            primaries = [
                r for r in self.topology.region_names if replication.is_primary(self.topology, r)
            ]
            if self.old_leader in primaries and self.new_leader_after is None:
                self.old_primary_until = now
            others = [r for r in primaries if r != self.old_leader]
            if others and self.new_leader_after is None:
                self.new_leader_after, self.new_leader = now, others[0]
            if (
                self.new_leader is not None
                and self.sync_after is None
                and replication.has_sync_standby(self.topology, self.new_leader)
            ):
                self.sync_after = now
            self.overlap = self.overlap or len(primaries) > 1
            self._stop.wait(0.25)


_BALANCES_SQL = (
    "SELECT a.account_id, a.balance_minor, "
    "coalesce((SELECT sum(e.amount_minor) FROM ledger_entries e "
    "          WHERE e.account_id = a.account_id), 0) "
    "FROM accounts a"
)


def _balances(conn: sa.Connection, accounts: list[str] | None) -> dict[str, tuple[int, int]]:
    """(stored balance, sum of entries) per account: of ``accounts``, or of every account."""
    query, params = _BALANCES_SQL, {}
    if accounts is not None:
        query += " WHERE a.account_id = ANY(CAST(:ids AS uuid[]))"
        params = {"ids": accounts}
    return {str(r[0]): (int(r[1]), int(r[2])) for r in conn.execute(sa.text(query), params).all()}


def ledger_violations(url: str) -> list[str]:
    """The ledger's invariants (``services.ledger.invariants``, the auditor's check) read
    from the database in one snapshot; empty when all hold."""
    engine = sa.create_engine(url, isolation_level="REPEATABLE READ")
    try:
        with engine.connect() as conn:
            report = invariants.check(conn)
    finally:
        engine.dispose()
    return [
        f"{name}: {v.count} (e.g. {', '.join(v.examples)})"
        for name, v in report.violations.items()
        if v.count
    ]


def _audit(url: str, accounts: list[str], workload: Workload) -> tuple[int, int, bool, list[str]]:
    """(lost, duplicated, conserved, notes) from the ledger itself."""
    notes = []
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            ids = [w.request_id for w in workload.writes]
            counts = {
                str(r[0]): int(r[1])
                for r in conn.execute(
                    sa.text(
                        "SELECT request_id, count(*) FROM transfers "
                        "WHERE request_id = ANY(:ids) GROUP BY request_id"
                    ),
                    {"ids": ids},
                ).all()
            }
            balances = _balances(conn, accounts)
    finally:
        engine.dispose()
    acked = [w for w in workload.writes if w.ok]
    lost = sum(1 for w in acked if counts.get(w.request_id, 0) == 0)
    duplicated = sum(1 for n in counts.values() if n > 1)
    applied_unacked = sum(1 for w in workload.writes if not w.ok and counts.get(w.request_id))
    if applied_unacked:
        notes.append(f"{applied_unacked} transfer(s) applied although the client saw a failure")
    total = sum(b for b, _ in balances.values())
    matches = all(b == e for b, e in balances.values())
    conserved = total == ACCOUNTS * OPENING_BALANCE and matches and len(balances) == ACCOUNTS
    if not matches:
        notes.append("a stored balance differs from the sum of its entries")
    return lost, duplicated, conserved, notes


def run(
    name: str,
    state: Path,
    topology: Topology,
    *,
    warmup: float = 3.0,
    hold: float = 12.0,
    settle: float = 5.0,
    restore_timeout: float = 120.0,
    log: Callable[[str], None] = lambda _m: None,
) -> DrillResult:
    if name not in DRILLS:
        raise DrillError(f"unknown drill {name!r}; known: {', '.join(DRILLS)}")
    status = local.read_status(state)
    if not status or status.get("phase") != "running":
        raise DrillError("meshbank is not running: start it with `meshbank up --detach`")
    if name == "region-partition" and local.read_network(state) is None:
        raise DrillError(NEEDS_NETNS)
    leader = replication.leader(topology)
    if leader is None:
        raise DrillError("the database has no leader right now")
    fault = Fault(name, state, leader)
    secret = local.load_secrets(state)
    # Clients sit in the leader's region: the worst case, their edge and their
    # region's services and database member all go down together in region-kill.
    address = status["endpoints"]["global"][leader]
    tag = f"drill-{name}-{uuid.uuid4().hex[:8]}"
    ca_file = public_client.ca_file(status)
    with public_client.grpc_channel(address, ca_file) as channel:
        token = partner_token(channel, secret)
        accounts = open_accounts(channel, token, secret["demo_treasury"], tag)
    log(f"{tag}: {ACCOUNTS} accounts opened; leader is {leader}")

    workload = Workload(address, token, accounts, ca_file)
    t0 = time.monotonic()
    workload.start()
    time.sleep(warmup)
    log(f"injecting {name} on {leader}")
    try:
        # Outages count from when the fault landed: listing a leader's processes to
        # pause takes 0.1-0.2 s, in which the old leader still commits.
        fault_at = fault.start()
        watch = LeaderWatch(topology, leader, fault_at)
        watch.start()
        time.sleep(hold)
    finally:
        lifted_at = time.monotonic()
        fault.stop()
    log("fault lifted; waiting for the region and replication to recover")
    deadline = time.monotonic() + restore_timeout
    while time.monotonic() < deadline and not _all_healthy(state):
        time.sleep(0.5)
    time.sleep(settle)
    workload.stop()
    end = time.monotonic()

    restored = False
    while time.monotonic() < deadline:
        if replication.replication_healthy(topology):
            restored = True
            break
        time.sleep(0.5)
    watch.stop()  # after the restore: the synchronous standby may come back late
    lost, duplicated, conserved, notes = _audit(
        local.primary_url(state, topology), accounts, workload
    )
    failed_reads: dict[str, int] = {}
    for r in workload.reads:
        if r.code != grpc.StatusCode.OK:
            failed_reads[r.code.name] = failed_reads.get(r.code.name, 0) + 1
    if failed_reads:
        notes.append(f"failed reads by status: {failed_reads}")
    failed_writes: dict[str, int] = {}
    for w in workload.writes:
        if not w.ok:
            failed_writes[w.code.name] = failed_writes.get(w.code.name, 0) + 1
    if failed_writes:
        notes.append(f"failed writes (after retries) by status: {failed_writes}")
    writes = [(w.started, w.finished, w.ok) for w in workload.writes]
    reads = [(r.started, r.finished, r.code == grpc.StatusCode.OK) for r in workload.reads]
    return DrillResult(
        drill=name,
        write_outage_s=outage_after(fault_at, writes),
        read_outage_s=longest_gap(fault_at, end, reads),
        acked=sum(1 for w in workload.writes if w.ok),
        lost=lost,
        duplicated=duplicated,
        conserved=conserved,
        replication_restored=restored,
        failed=sum(1 for w in workload.writes if not w.ok),
        reads_ok=sum(1 for r in workload.reads if r.code == grpc.StatusCode.OK),
        reads_failed=sum(1 for r in workload.reads if r.code != grpc.StatusCode.OK),
        leader_before=leader,
        clients_in=leader,
        leader_after=replication.wait_leader(topology, within=30.0),
        fault_at_s=fault_at - t0,
        fault_lifted_at_s=lifted_at - t0,
        old_leader_primary_until_s=watch.old_primary_until,
        new_leader_after_s=watch.new_leader_after,
        primaries_overlap=watch.overlap,
        sync_standby_after_s=watch.sync_after,
        notes=notes,
    )


def _all_healthy(state: Path) -> bool:
    status = local.read_status(state)
    return status is not None and all(p["healthy"] for p in status["processes"])


def table(result: DrillResult) -> str:
    data = result.as_dict()
    width = max(len(k) for k in data)
    lines = [f"{k:<{width}}  {v}" for k, v in data.items()]
    lines.append(f"{'verdict':<{width}}  {'PASS' if result.passed else 'FAIL'}")
    return "\n".join(lines)
