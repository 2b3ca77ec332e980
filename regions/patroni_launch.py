"""Run a Patroni member with one upstream fix backported (``patroni_launch.py CONFIG``).

Runs under Patroni's own interpreter (``/opt/meshbank/patroni-venv``), not meshbank's, so
it imports nothing but the standard library and Patroni. ``regions.replication`` copies
it next to each member's ``patroni.yaml``, where the postgres user can read it.

The fix: Patroni 3.1.2 runs ``postgres --describe-config`` every time it writes
``postgresql.conf`` (``Postgresql.available_gucs``), twice per write. A new leader
rewrites it at each change of ``synchronous_standby_names``; on a loaded machine each run
took 0.5-4.6 s inside the HA loop (py-spy, docs/benchmarks.md), so the loop overran the
leader key's ttl right after a failover. Later Patroni releases cache the list in
``Postgresql.available_gucs`` the same way; 3.1.2 stays pinned (see regions/replication.py).
The list of a binary's GUCs cannot change while the process runs: a new major version
needs a new postmaster, and with it a new Patroni.
"""

from __future__ import annotations

import sys
from typing import Any

_CACHE_ATTRIBUTE = "_meshbank_available_gucs"


def backport_guc_cache() -> None:
    """Make ``Postgresql._get_gucs`` run ``postgres --describe-config`` once per member."""
    from patroni.postgresql import Postgresql

    uncached = Postgresql._get_gucs
    if getattr(uncached, "meshbank_cached", False):
        return

    def _get_gucs(self: Any) -> Any:
        gucs = self.__dict__.get(_CACHE_ATTRIBUTE)
        if not gucs:
            gucs = self.__dict__[_CACHE_ATTRIBUTE] = uncached(self)
        return gucs

    _get_gucs.meshbank_cached = True  # type: ignore[attr-defined]
    Postgresql._get_gucs = _get_gucs


def main() -> None:
    backport_guc_cache()
    from patroni.__main__ import main as patroni_main

    sys.argv[0] = "patroni"
    patroni_main()


if __name__ == "__main__":
    main()
