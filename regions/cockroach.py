"""CockroachDB nodes for the local deployment, used instead of PostgreSQL + Patroni
when a ``cockroach`` binary is on PATH (or ``MESHBANK_COCKROACH`` names one).

One node per topology region, started with ``--locality=region=R,zone=Z`` so that the
multi-region DDL of migration 0002 (PRIMARY REGION, ADD REGION, SURVIVE REGION FAILURE,
REGIONAL BY ROW, GLOBAL) places data where the topology says. Nodes listen on the
database and Patroni ports of the port plan (SQL and HTTP), so the sidecars' database
clusters work unchanged with ``/health?ready=1`` as the health check.

No CockroachDB binary can be installed on the machines this project is developed on:
the command lines are unit-tested, the live path is exercised only where a binary
exists (tests skip with that reason elsewhere).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import sqlalchemy as sa

from regions.topology import Topology


def binary() -> str | None:
    return os.environ.get("MESHBANK_COCKROACH") or shutil.which("cockroach")


@dataclass(frozen=True)
class Paths:
    store: Path


def node_argv(topology: Topology, region: str, paths: Paths) -> list[str]:
    host = topology.host
    zone = topology.region(region).zones[0]
    join = ",".join(f"{host}:{topology.database_port(r)}" for r in topology.region_names)
    return [
        binary() or "cockroach",
        "start",
        # Loopback only, on one machine: a production cluster uses certificates.
        "--insecure",
        f"--store={paths.store / region}",
        f"--listen-addr={host}:{topology.database_port(region)}",
        f"--http-addr={host}:{topology.patroni_port(region)}",
        f"--join={join}",
        f"--locality=region={region},zone={zone}",
        "--cache=256MiB",
        "--max-sql-memory=256MiB",
    ]


class LocalCluster:
    """Three local nodes (one per region), initialised once."""

    def __init__(self, topology: Topology, base: Path) -> None:
        self.topology = topology
        self.paths = Paths(base)
        self.processes: list[subprocess.Popen[bytes]] = []

    def url(self, database: str = "meshbank") -> str:
        port = self.topology.database_port(self.topology.region_names[0])
        return f"cockroachdb+psycopg://root@{self.topology.host}:{port}/{database}?sslmode=disable"

    def start(self, timeout: float = 120.0) -> None:
        """Start every node (for tests; ``meshbank up`` supervises them itself)."""
        for region in self.topology.region_names:
            log = open(self.paths.store / f"{region}.log", "ab")  # noqa: SIM115 - child's
            self.processes.append(
                subprocess.Popen(
                    node_argv(self.topology, region, self.paths),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        self.initialise(timeout)

    def initialise(self, timeout: float = 120.0) -> None:
        """``cockroach init`` (a no-op once done) and create the database."""
        first = self.topology.region_names[0]
        subprocess.run(
            [
                binary() or "cockroach",
                "init",
                "--insecure",
                f"--host={self.topology.host}:{self.topology.database_port(first)}",
            ],
            check=False,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                engine = sa.create_engine(self.url("defaultdb"))
                with engine.connect() as conn:
                    conn.execute(sa.text("CREATE DATABASE IF NOT EXISTS meshbank"))
                    conn.commit()
                engine.dispose()
                return
            except sa.exc.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(1)

    def query(self, sql: str) -> list[str]:
        engine = sa.create_engine(self.url())
        try:
            with engine.connect() as conn:
                return [str(row[0]) for row in conn.execute(sa.text(sql))]
        finally:
            engine.dispose()

    def stop(self) -> None:
        for proc in self.processes:
            proc.terminate()
        for proc in self.processes:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
