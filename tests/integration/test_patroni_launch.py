"""The Patroni launcher's backport, run in Patroni's own venv against the real binaries."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from regions import replication, topology
from regions.postgres import PG_BIN

# Runs in Patroni's interpreter: the real Postgresql._get_gucs and the real
# `postgres --describe-config`, with subprocess.check_output counted.
_PROBE = """
import json, runpy, subprocess, sys, types
launcher = runpy.run_path(sys.argv[1])
calls = []
real = subprocess.check_output
def counted(*args, **kwargs):
    calls.append(args[0])
    return real(*args, **kwargs)
subprocess.check_output = counted
from patroni.postgresql import Postgresql
before = Postgresql._get_gucs
launcher["backport_guc_cache"]()
launcher["backport_guc_cache"]()
member = types.SimpleNamespace(pgcommand=lambda name: sys.argv[2] + "/" + name)
first = Postgresql._get_gucs(member)
second = Postgresql._get_gucs(member)
other = Postgresql._get_gucs(types.SimpleNamespace(pgcommand=member.pgcommand))
print(json.dumps({
    "patched": Postgresql._get_gucs is not before,
    "calls": len(calls),
    "same": first is second,
    "count": len(first),
    "has_max_connections": "MAX_CONNECTIONS" in first,
    "other_equal": set(other) == set(first),
}))
"""


def test_the_launcher_runs_describe_config_once_per_member() -> None:
    out = subprocess.run(
        [replication.patroni_python(), "-c", _PROBE, str(replication.LAUNCHER), str(PG_BIN)],
        check=True,
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    result = json.loads(out)
    assert result["patched"]
    # two members (objects), three lookups: one subprocess each, none for the repeat
    assert result["calls"] == 2
    assert result["same"]
    assert result["count"] > 300  # PostgreSQL 15 has ~350 settings
    assert result["has_max_connections"]  # CaseInsensitiveSet
    assert result["other_equal"]


def test_members_run_the_launcher_with_their_config(tmp_path: Path) -> None:
    secret = {"database_password": "p", "replication_password": "r"}
    replication.write_member_config(topology.load(), "us-east", tmp_path, secret)
    written = tmp_path / "us-east" / "patroni_launch.py"
    assert written.read_text() == replication.LAUNCHER.read_text()
    assert written.stat().st_mode & 0o777 == 0o600
    argv = replication.patroni_argv(tmp_path, "us-east")
    assert argv[-3:] == [
        replication.patroni_python(),
        str(tmp_path / "us-east" / "patroni_launch.py"),
        str(tmp_path / "us-east" / "patroni.yaml"),
    ]
