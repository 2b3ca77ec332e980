"""The CockroachDB path: the multi-region DDL the migrations generate (checked here,
where no `cockroach` binary can be installed) and, where one is on PATH, a live run."""

from __future__ import annotations

import shutil

import pytest

from regions import cockroach, migrate, topology


@pytest.fixture(scope="module")
def crdb_sql() -> str:
    return migrate.offline_sql("cockroachdb")


def test_the_database_survives_a_region_failure(crdb_sql: str) -> None:
    regions = topology.load().region_names
    assert f'ALTER DATABASE "meshbank" SET PRIMARY REGION "{regions[0]}"' in crdb_sql
    for region in regions[1:]:
        assert f'ALTER DATABASE "meshbank" ADD REGION IF NOT EXISTS "{region}"' in crdb_sql
    assert 'ALTER DATABASE "meshbank" SURVIVE REGION FAILURE' in crdb_sql
    # Every region of the topology, in order: DDL after the region changes.
    assert crdb_sql.index("SURVIVE REGION FAILURE") < crdb_sql.index("SET LOCALITY")


def test_tables_are_placed_by_how_they_are_used(crdb_sql: str) -> None:
    for table in ("currencies", "signing_keys"):
        assert f"ALTER TABLE {table} SET LOCALITY GLOBAL" in crdb_sql
    assert "ALTER TABLE accounts SET LOCALITY REGIONAL BY ROW AS crdb_region" in crdb_sql
    assert "crdb_region crdb_internal_region NOT VISIBLE NOT NULL AS (CASE home_region" in crdb_sql
    for table in ("transfers", "ledger_entries", "idempotency_keys", "users", "refresh_tokens"):
        assert f"ALTER TABLE {table} SET LOCALITY REGIONAL BY ROW;" in crdb_sql


def test_postgres_only_triggers_stay_off_cockroachdb(crdb_sql: str) -> None:
    assert "plpgsql" not in crdb_sql
    postgres_sql = migrate.offline_sql("postgresql")
    assert "plpgsql" in postgres_sql
    assert "SET LOCALITY" not in postgres_sql
    assert "CREATE CONSTRAINT TRIGGER ledger_entries_balanced" in postgres_sql


def test_nodes_start_with_their_topology_locality(tmp_path: object) -> None:
    t = topology.load()
    argv = cockroach.node_argv(t, "us-west", cockroach.Paths(store=tmp_path))  # type: ignore[arg-type]
    joined = " ".join(argv)
    assert "--locality=region=us-west,zone=us-west-2a" in joined
    for region in t.region_names:
        assert f"127.0.0.1:{t.database_port(region)}" in joined  # --join lists every node


@pytest.mark.skipif(
    shutil.which("cockroach") is None,
    reason="no `cockroach` binary on PATH (none can be installed on these machines)",
)
def test_live_multi_region_cluster(tmp_path: object) -> None:  # pragma: no cover - needs cockroach
    cluster = cockroach.LocalCluster(topology.load(), tmp_path)  # type: ignore[arg-type]
    try:
        cluster.start()
        migrate.upgrade(cluster.url())
        regions = cluster.query("SELECT region FROM [SHOW REGIONS FROM DATABASE meshbank]")
        assert sorted(regions) == sorted(topology.load().region_names)
    finally:
        cluster.stop()
