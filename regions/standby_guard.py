"""Restarts a standby that Patroni 3.1.2 started with nowhere to stream from.

Patroni issue #3675 (https://github.com/patroni/patroni/issues/3675): when a former
primary is rewound and the leader key happens to be absent from etcd at that moment,
Patroni starts PostgreSQL as a standby *without* ``primary_conninfo``. PostgreSQL then
waits forever for WAL nobody sends, never reaches a consistent state, and stays
"starting"; Patroni cannot connect to it, falls back to its cached role, and never
rewrites the configuration. Replication is never restored. It happened here after a
region-kill drill on a loaded machine.

The guard watches each member: one whose Patroni has reported a *starting replica* for
``stuck_after`` seconds, while another member holds the leader role, and whose
``postgresql.conf`` names no ``primary_conninfo``, is to be restarted. A fresh Patroni
sees the leader and starts PostgreSQL following it. A standby that is merely slow
to start (replaying WAL it streams) has ``primary_conninfo`` and is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STUCK_AFTER_S = 20.0


def streams_from_somewhere(data_dir: Path) -> bool:
    """Whether PostgreSQL's configuration names a server to stream WAL from.

    Patroni writes the recovery settings into ``postgresql.conf`` on PostgreSQL >= 12.
    An unreadable file counts as "yes": never restart on a guess.
    """
    for name in ("postgresql.conf", "postgresql.auto.conf"):
        try:
            text = (data_dir / name).read_text(errors="replace")
        except FileNotFoundError:
            continue
        except OSError:
            return True
        for line in text.splitlines():
            key, sep, value = line.partition("=")
            if sep and key.strip() == "primary_conninfo" and value.strip().strip("'"):
                return True
    return False


@dataclass
class StandbyGuard:
    """Decides, from what each member's Patroni reports over time, which to restart."""

    stuck_after: float = STUCK_AFTER_S
    _starting_since: dict[str, float] = field(default_factory=dict)
    _starting_seen: dict[str, float] = field(default_factory=dict)

    def observe(
        self,
        now: float,
        members: Mapping[str, Mapping[str, Any] | None],
        leader: str | None,
        data_dirs: Mapping[str, Path],
    ) -> list[str]:
        """The regions whose member to restart now.

        ``members``: region -> Patroni's ``GET /patroni`` body (None when it did not
        answer); ``leader``: the region whose member answers ``/primary``.
        """
        restart = []
        for region, body in members.items():
            if body is None:
                # No answer: a busy Patroni misses a request now and then, which must
                # not restart the clock; a member silent for long starts it afresh.
                if now - self._starting_seen.get(region, now) > self.stuck_after:
                    self._starting_since.pop(region, None)
                continue
            if body.get("state") != "starting" or body.get("role") != "replica":
                self._starting_since.pop(region, None)
                continue
            self._starting_seen[region] = now
            since = self._starting_since.setdefault(region, now)
            if leader is None or leader == region or now - since < self.stuck_after:
                continue
            if streams_from_somewhere(data_dirs[region]):
                continue
            log.warning(
                "%s: a standby starting for %.0f s with no primary_conninfo while %s leads "
                "(Patroni issue #3675); restarting its Patroni",
                region,
                now - since,
                leader,
            )
            self._starting_since.pop(region)
            restart.append(region)
        return restart
