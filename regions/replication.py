"""The replicated database of the local deployment: etcd + Patroni + PostgreSQL per region.

Settings measured on these machines (DESIGN.md, "Data layer"): Patroni 3.1.2 from PyPI
(Debian's 3.0.2 lost acknowledged writes when a paused old leader resumed; 3.2+ forces
ttl >= 20), ``ttl 6 / loop_wait 1 / retry_timeout 2`` (a 6.4-6.6 s write outage after
SIGKILL of the leader), synchronous replication so an acknowledged write is on two
regions, etcd with ``--pre-vote`` (without it healing a partition causes a second
outage), ``failsafe_mode`` off.
"""

from __future__ import annotations

import json
import os
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from regions.postgres import PG_BIN, chown_to_postgres, run_as_postgres
from regions.topology import Topology

SCOPE = "meshbank"


def patroni_venv() -> Path:
    """Patroni's own venv, built with Debian's /usr/bin/python3 (see tools/bootstrap.sh).

    A venv of the pyenv Python in root's 0700 home is unreadable for the postgres user,
    which hung bootstrap here; Debian's interpreter lives in /usr.
    """
    return Path(os.environ.get("MESHBANK_PATRONI_VENV", "/opt/meshbank/patroni-venv"))


def patroni_python() -> str:
    return str(patroni_venv() / "bin" / "python3")


# Run by Patroni's interpreter instead of its ``patroni`` script: Patroni 3.1.2 with the
# upstream cache of ``postgres --describe-config`` backported (see the module).
LAUNCHER = Path(__file__).with_name("patroni_launch.py")


def etcd_binary() -> str:
    return os.environ.get("MESHBANK_ETCD", "/usr/bin/etcd")


def etcd_argv(topology: Topology, region: str, data_dir: Path) -> list[str]:
    cluster = ",".join(
        f"{r}=http://{topology.host_of(r)}:{topology.etcd_peer_port(r)}"
        for r in topology.region_names
    )
    client = f"http://{topology.host_of(region)}:{topology.etcd_client_port(region)}"
    peer = f"http://{topology.host_of(region)}:{topology.etcd_peer_port(region)}"
    return [
        etcd_binary(),
        "--name",
        region,
        "--data-dir",
        str(data_dir),
        "--listen-client-urls",
        client,
        "--advertise-client-urls",
        client,
        "--listen-peer-urls",
        peer,
        "--initial-advertise-peer-urls",
        peer,
        "--initial-cluster",
        cluster,
        "--initial-cluster-token",
        f"{SCOPE}-etcd",
        "--initial-cluster-state",
        "new",
        # Without pre-vote, a healed partition forces a second election (2-3 s outage).
        "--pre-vote=true",
        "--heartbeat-interval",
        "100",
        "--election-timeout",
        "1000",
        "--logger",
        "zap",
        "--log-level",
        "warn",
    ]


PATRONI_REQUEST_QUEUE = 1024  # the REST API's listen backlog (Patroni's default: 5)


def patroni_config(
    topology: Topology, region: str, member_dir: Path, secret: Mapping[str, str]
) -> dict[str, Any]:
    host = topology.host_of(region)
    # Who may connect: the members (replication, pg_rewind), and the services'
    # sidecars and the operator, which sit on the same host or, in netns mode, in the
    # deployment's network (regions and the root namespace).
    clients = sorted(
        {f"{topology.host}/32", *(f"{topology.host_of(r)}/32" for r in topology.region_names)}
        | ({topology.region_network} if topology.region_network else set())
    )
    return {
        "scope": SCOPE,
        "namespace": f"/{SCOPE}/",
        "name": region,
        "log": {"level": "WARNING"},
        "restapi": {
            "listen": f"{host}:{topology.patroni_port(region)}",
            "connect_address": f"{host}:{topology.patroni_port(region)}",
            # Every sidecar health-checks every member twice a second (~70 connections
            # a second per member). With Patroni's default accept queue of 5 the kernel
            # dropped ~35 SYNs a second even at idle (TcpExtListenOverflows), each
            # retransmitted a second later: checks timed out, and a healthy leader was
            # marked down and its connections closed (docs/benchmarks.md).
            "request_queue_size": PATRONI_REQUEST_QUEUE,
        },
        "etcd3": {
            "hosts": [
                f"{topology.host_of(r)}:{topology.etcd_client_port(r)}"
                for r in topology.region_names
            ],
            "protocol": "http",
        },
        "bootstrap": {
            "dcs": {
                "ttl": 6,
                "loop_wait": 1,
                "retry_timeout": 2,
                "maximum_lag_on_failover": 1048576,
                # Only a synchronous standby may be promoted, and a commit returns only
                # once one standby in another region has it: an acknowledged write
                # survives the loss of any one region.
                "synchronous_mode": True,
                "failsafe_mode": False,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": {
                        "wal_level": "replica",
                        "hot_standby": "on",
                        # Patroni opens a replication connection to a replica's own
                        # PostgreSQL for every REST request while the replica's timeline
                        # differs from the leader's (right after a failover): at the
                        # sidecars' health-check rate 10 walsenders ran out, the
                        # replica's own timeline checks failed and it stopped following
                        # the new leader, twice (docs/benchmarks.md, drills).
                        "max_wal_senders": 64,
                        "max_replication_slots": 10,
                        "wal_log_hints": "on",
                        "max_connections": 400,
                        "wal_sender_timeout": "5s",
                        "wal_receiver_status_interval": "1s",
                        # A standby that asked the new leader for its slot before the
                        # leader created it retries in 1 s, not PostgreSQL's 5 s.
                        "wal_retrieve_retry_interval": "1s",
                        "hot_standby_feedback": "on",
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C.UTF-8"}, "data-checksums"],
        },
        "postgresql": {
            "listen": f"{host}:{topology.database_port(region)}",
            "connect_address": f"{host}:{topology.database_port(region)}",
            "data_dir": str(member_dir / "data"),
            "bin_dir": str(PG_BIN),
            "pgpass": str(member_dir / "pgpass"),
            "authentication": {
                "superuser": {"username": "meshbank", "password": secret["database_password"]},
                "replication": {
                    "username": "replicator",
                    "password": secret["replication_password"],
                },
                "rewind": {"username": "meshbank", "password": secret["database_password"]},
            },
            "pg_hba": [
                "local all all trust",
                *(f"host replication replicator {net} scram-sha-256" for net in clients),
                *(f"host all all {net} scram-sha-256" for net in clients),
            ],
            "parameters": {
                "unix_socket_directories": str(member_dir),
                "shared_buffers": "128MB",
                "password_encryption": "scram-sha-256",
            },
        },
        "tags": {"nofailover": False, "noloadbalance": False, "region": region},
    }


def member_config_path(db_dir: Path, region: str) -> Path:
    return db_dir / region / "patroni.yaml"


def member_launcher_path(db_dir: Path, region: str) -> Path:
    return db_dir / region / LAUNCHER.name


def write_member_config(
    topology: Topology, region: str, db_dir: Path, secret: Mapping[str, str]
) -> None:
    """Write a member's Patroni config and launcher (regenerated on every start).

    The launcher is copied because the postgres user may not read the checkout.
    """
    member_dir = db_dir / region
    member_dir.mkdir(parents=True, exist_ok=True)
    member_dir.chmod(0o700)
    chown_to_postgres(member_dir)
    config = member_config_path(db_dir, region)
    config.write_text(yaml.safe_dump(patroni_config(topology, region, member_dir, secret)))
    launcher = member_launcher_path(db_dir, region)
    launcher.write_text(LAUNCHER.read_text())
    for path in (config, launcher):
        path.chmod(0o600)
        chown_to_postgres(path)


def patroni_argv(db_dir: Path, region: str) -> list[str]:
    """The command that runs a member (as the postgres user when we are root)."""
    return [
        *run_as_postgres(),
        patroni_python(),
        str(member_launcher_path(db_dir, region)),
        str(member_config_path(db_dir, region)),
    ]


def patroni_get(
    port: int, path: str, host: str = "127.0.0.1", timeout: float = 1.0
) -> tuple[int, Any]:
    """GET a Patroni REST endpoint; (status, JSON body) or (0, None) if unreachable."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}{path}", timeout=timeout) as reply:
            return reply.status, json.loads(reply.read() or b"null")
    except urllib.error.HTTPError as err:
        try:
            return err.code, json.loads(err.read() or b"null")
        except ValueError:
            return err.code, None
    except (OSError, ValueError):
        return 0, None


def patroni_up(host: str, port: int) -> bool:
    """Patroni answers and its PostgreSQL is running (``/health``); a busy machine gets 2 s."""
    return patroni_get(port, "/health", host=host, timeout=2.0)[0] == 200


def cluster_state(topology: Topology) -> dict[str, Any] | None:
    """Patroni's view of the cluster (members, roles, lag), from the first member that answers."""
    for region in topology.region_names:
        code, body = patroni_get(
            topology.patroni_port(region), "/cluster", host=topology.host_of(region)
        )
        if code == 200 and isinstance(body, dict):
            return body
    return None


def is_primary(topology: Topology, region: str, timeout: float = 1.0) -> bool:
    """Patroni's own answer: 200 on ``/primary`` only on the leader."""
    port, host = topology.patroni_port(region), topology.host_of(region)
    return patroni_get(port, "/primary", host=host, timeout=timeout)[0] == 200


def leader(topology: Topology, timeout: float = 1.0) -> str | None:
    """The region whose member is the primary, according to the members themselves."""
    return next((r for r in topology.region_names if is_primary(topology, r, timeout)), None)


def wait_leader(topology: Topology, within: float) -> str | None:
    """The leader once one answers, polling for up to ``within`` seconds; None if none did.

    A member that has just been promoted, or a Patroni busy on a loaded machine, can miss
    one short request; a single probe would then report no leader where there is one.
    """
    deadline = time.monotonic() + within
    while True:
        found = leader(topology, timeout=3.0)
        if found is not None or time.monotonic() >= deadline:
            return found
        time.sleep(0.5)


def replication_healthy(topology: Topology) -> bool:
    """One leader, every other member streaming with no lag, and a synchronous standby."""
    state = cluster_state(topology)
    if not state:
        return False
    members = state.get("members", [])
    if len(members) != len(topology.region_names):
        return False
    leaders = [m for m in members if m.get("role") == "leader"]
    sync = [m for m in members if m.get("role") == "sync_standby"]
    others = [m for m in members if m.get("role") != "leader"]
    streaming = all(m.get("state") in ("streaming", "running") for m in others)
    lag_zero = all(m.get("lag", 0) in (0, "0") for m in others)
    return len(leaders) == 1 and len(sync) >= 1 and streaming and lag_zero


def has_sync_standby(topology: Topology, leader: str) -> bool:
    """``leader`` is the primary and names a synchronous standby (Patroni's ``/cluster``
    from the leader itself): its commits wait for a second region again."""
    port, host = topology.patroni_port(leader), topology.host_of(leader)
    code, body = patroni_get(port, "/cluster", host=host)
    if code != 200 or not isinstance(body, dict):
        return False
    roles = {m.get("name"): m.get("role") for m in body.get("members", [])}
    return roles.get(leader) == "leader" and "sync_standby" in roles.values()


def postmaster_pid(member_dir: Path) -> int | None:
    try:
        return int((member_dir / "data" / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
