"""Keeps etcd's raft leader out of the region of the database leader.

When an etcd member becomes raft leader, it renews every lease to its full ttl (etcd's
``lessor.Promote``). Patroni's leader key lives on such a lease. So when a region dies
that holds both the database leader and etcd's raft leader, the dead leader's key does
not expire ttl (6 s) after its last renewal, but etcd's election (~1-2 s here) plus a
fresh ttl later: measured here, the new database leader came 8.1-8.7 s after a
region-kill in that case, and 6.0-6.4 s after a db-leader-kill, which leaves etcd
alone (docs/benchmarks.md, drills).

The supervisor therefore checks every few seconds where etcd's leader is and, when it
shares the database leader's region, hands raft leadership to the member of another
region (etcd's ``MoveLeader``, what ``etcdctl move-leader`` sends). It prefers the
region of the asynchronous replica, so that losing that region costs one election,
not an election and a change of synchronous standby. It never moves leadership while
the database has no leader (the renewal would delay the failover in progress) or while
the members disagree on who leads (a partition).
"""

from __future__ import annotations

import json
import logging
import urllib.request
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from typing import Any

from regions.topology import Topology

log = logging.getLogger(__name__)

MOVE_EVERY_S = 10.0  # at most one hand-over per this many seconds


@dataclass(frozen=True)
class MemberStatus:
    """What one etcd member reports: its own id, the leader's id, the raft term."""

    member_id: str
    leader_id: str
    term: str


def leader_region(statuses: Mapping[str, MemberStatus | None]) -> str | None:
    """The region of etcd's leader, when the members that answered (two at least)
    agree on it and its term; None during an election or a partition.

    ``statuses``: region -> that member's status (None when it did not answer).
    """
    answered = [s for s in statuses.values() if s is not None]
    views = {(s.leader_id, s.term) for s in answered}
    if len(answered) < 2 or len(views) != 1:
        return None
    leader_id = next(iter(views))[0]
    return next((r for r, s in statuses.items() if s and s.member_id == leader_id), None)


def choose_target(
    statuses: Mapping[str, MemberStatus | None],
    db_leader: str | None,
    sync_standbys: Collection[str],
) -> tuple[str, str] | None:
    """``(from_region, to_region)`` when etcd's leader should move, else None."""
    if db_leader is None or leader_region(statuses) != db_leader:
        return None
    candidates = [r for r, s in statuses.items() if s is not None and r != db_leader]
    candidates.sort(key=lambda r: (r in sync_standbys, r))
    return (db_leader, candidates[0]) if candidates else None


def _post(topology: Topology, region: str, path: str, body: dict[str, Any], timeout: float) -> Any:
    url = f"http://{topology.host_of(region)}:{topology.etcd_client_port(region)}{path}"
    request = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=timeout) as reply:  # noqa: S310 - http: only
        return json.loads(reply.read() or b"null")


def member_status(topology: Topology, region: str, timeout: float = 1.0) -> MemberStatus | None:
    """The member's ``Maintenance.Status`` (etcd's JSON gateway), None if it did not answer."""
    try:
        body = _post(topology, region, "/v3/maintenance/status", {}, timeout)
        return MemberStatus(
            str(body["header"]["member_id"]), str(body["leader"]), str(body["raftTerm"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def move_leader(
    topology: Topology,
    from_region: str,
    to_region: str,
    statuses: Mapping[str, MemberStatus | None],
    timeout: float = 5.0,
) -> bool:
    """Ask the leader (``from_region``) to hand raft leadership to ``to_region``'s member."""
    target = statuses.get(to_region)
    if target is None:
        return False
    try:
        _post(
            topology,
            from_region,
            "/v3/maintenance/transfer-leadership",
            {"targetID": target.member_id},
            timeout,
        )
    except (OSError, ValueError) as exc:
        log.warning("moving etcd's leader from %s to %s failed: %s", from_region, to_region, exc)
        return False
    return True


def place(
    topology: Topology, db_leader: str | None, cluster: Mapping[str, Any] | None
) -> str | None:
    """Move etcd's leader out of ``db_leader``'s region if it is there; the new region.

    ``db_leader`` is the member that answered ``/primary`` a moment ago; ``cluster`` is
    Patroni's ``/cluster``, read just now. They must agree: a leader that died since
    would have its successor's election delayed by the move.
    """
    if db_leader is None or cluster_leader(cluster) != db_leader:
        return None
    statuses = {r: member_status(topology, r) for r in topology.region_names}
    move = choose_target(statuses, db_leader, sync_standbys(cluster))
    if move is None:
        return None
    if not move_leader(topology, *move, statuses):
        return None
    log.info("moved etcd's leader from %s, the database leader's region, to %s", *move)
    return move[1]


def cluster_leader(cluster: Mapping[str, Any] | None) -> str | None:
    """The running leader Patroni's ``/cluster`` names, if any."""
    members = (cluster or {}).get("members") or []
    leaders = [m for m in members if m.get("role") == "leader" and m.get("state") == "running"]
    return str(leaders[0].get("name")) if len(leaders) == 1 else None


def sync_standbys(cluster: Mapping[str, Any] | None) -> set[str]:
    """The members Patroni's ``/cluster`` names synchronous standbys."""
    members = (cluster or {}).get("members") or []
    return {str(m.get("name")) for m in members if m.get("role") == "sync_standby"}
