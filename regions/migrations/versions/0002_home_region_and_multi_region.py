"""Home region per account; on CockroachDB, the multi-region layout of every table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24

On CockroachDB the database gets a PRIMARY REGION and every other topology region,
SURVIVE REGION FAILURE, per-customer tables REGIONAL BY ROW (an account lives in its
owner's home region; transfers, entries and request ids where they were written,
which the mesh keeps in the caller's region) and reference data GLOBAL (fast reads
everywhere, slower writes). On PostgreSQL the same tables exist; replication of the
whole database to every region is Patroni's job.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op

from regions import topology as topo

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

GLOBAL_TABLES = ("currencies", "signing_keys")
# Rows placed in the region of the gateway node that wrote them (the caller's region).
BY_GATEWAY = (
    "transfers",
    "ledger_entries",
    "idempotency_keys",
    "users",
    "partners",
    "refresh_tokens",
)


def _database_name() -> str:
    name = context.config.attributes.get("database_name")
    if name:
        return str(name)
    bind = op.get_bind()
    return str(bind.engine.url.database or "meshbank")


def multi_region_ddl(database: str, regions: tuple[str, ...]) -> list[str]:
    """The CockroachDB statements that make the schema multi-region."""
    primary, *others = regions
    region_case = " ".join(f"WHEN '{r}' THEN '{r}'" for r in regions)
    statements = [f'ALTER DATABASE "{database}" SET PRIMARY REGION "{primary}"']
    statements += [f'ALTER DATABASE "{database}" ADD REGION IF NOT EXISTS "{r}"' for r in others]
    statements.append(f'ALTER DATABASE "{database}" SURVIVE REGION FAILURE')
    statements += [f"ALTER TABLE {t} SET LOCALITY GLOBAL" for t in GLOBAL_TABLES]
    statements += [
        # The account's partition follows its owner's home region.
        "ALTER TABLE accounts ADD COLUMN crdb_region crdb_internal_region NOT VISIBLE "
        f"NOT NULL AS (CASE home_region {region_case} ELSE '{primary}' END) STORED",
        "ALTER TABLE accounts SET LOCALITY REGIONAL BY ROW AS crdb_region",
    ]
    statements += [f"ALTER TABLE {t} SET LOCALITY REGIONAL BY ROW" for t in BY_GATEWAY]
    return statements


def upgrade() -> None:
    regions = topo.load().region_names
    op.add_column(
        "accounts",
        sa.Column("home_region", sa.Text, nullable=False, server_default=regions[0]),
    )
    op.alter_column("accounts", "home_region", server_default=None)
    if context.get_context().dialect.name == "cockroachdb":
        # Region changes cannot run inside a multi-statement transaction.
        with context.get_context().autocommit_block():
            for statement in multi_region_ddl(_database_name(), regions):
                op.execute(statement)


def downgrade() -> None:
    if context.get_context().dialect.name == "cockroachdb":
        op.execute("ALTER TABLE accounts SET LOCALITY REGIONAL BY TABLE IN PRIMARY REGION")
        op.drop_column("accounts", "crdb_region")
    op.drop_column("accounts", "home_region")
