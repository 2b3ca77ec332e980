"""Ledger, idempotency and auth tables; append-only and double-entry enforced by the database.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, JSONB, UUID

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
NOW = sa.text("now()")

CURRENCIES = [
    ("USD", 2, "US dollar"),
    ("EUR", 2, "Euro"),
    ("GBP", 2, "Pound sterling"),
    ("JPY", 0, "Yen"),
    ("CHF", 2, "Swiss franc"),
]

# PL/pgSQL guards (PostgreSQL). CockroachDB gets the same guarantees from the
# privileges set up by its multi-region migration (see docs/architecture.md).
APPEND_ONLY = """
CREATE FUNCTION meshbank_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  RAISE EXCEPTION '% is append-only: % refused', TG_TABLE_NAME, TG_OP
    USING ERRCODE = 'restrict_violation';
END $$;
"""
BALANCED = """
CREATE FUNCTION meshbank_check_balanced() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE total numeric; n integer;
BEGIN
  SELECT coalesce(sum(amount_minor), 0), count(*) INTO total, n
    FROM ledger_entries WHERE transfer_id = NEW.transfer_id;
  IF total <> 0 OR n <> 2 THEN
    RAISE EXCEPTION 'transfer % is unbalanced: % entries summing to %', NEW.transfer_id, n, total
      USING ERRCODE = 'check_violation';
  END IF;
  RETURN NULL;
END $$;
"""


def upgrade() -> None:
    op.create_table(
        "currencies",
        sa.Column("code", sa.String(3), nullable=False),
        sa.Column("minor_units", sa.SmallInteger, nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.PrimaryKeyConstraint("code", name="pk_currencies"),
    )
    op.bulk_insert(
        sa.table(
            "currencies",
            sa.column("code", sa.String),
            sa.column("minor_units", sa.SmallInteger),
            sa.column("name", sa.Text),
        ),
        [{"code": c, "minor_units": m, "name": n} for c, m, n in CURRENCIES],
    )
    op.create_table(
        "users",
        sa.Column("user_id", UUID(as_uuid=True), nullable=False),
        sa.Column("username", sa.Text, nullable=False),
        sa.Column("password_hash", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("user_id", name="pk_users"),
        sa.UniqueConstraint("username", name="uq_users_username"),
    )
    op.create_table(
        "partners",
        sa.Column("partner_id", UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.Text, nullable=False),
        sa.Column("client_id", sa.Text, nullable=False),
        sa.Column("secret_hash", BYTEA, nullable=False),
        sa.Column("scopes", ARRAY(sa.Text), nullable=False),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("partner_id", name="pk_partners"),
        sa.UniqueConstraint("name", name="uq_partners_name"),
        sa.UniqueConstraint("client_id", name="uq_partners_client_id"),
    )
    op.create_table(
        "signing_keys",
        sa.Column("kid", sa.Text, nullable=False),
        sa.Column("algorithm", sa.Text, nullable=False),
        sa.Column("private_key_pem", sa.Text, nullable=False),
        sa.Column("public_jwk", JSONB, nullable=False),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
        sa.Column("retired_at", TZ),
        sa.PrimaryKeyConstraint("kid", name="pk_signing_keys"),
    )
    op.create_table(
        "refresh_tokens",
        sa.Column("token_id", UUID(as_uuid=True), nullable=False),
        sa.Column("token_hash", BYTEA, nullable=False),
        sa.Column("family_id", UUID(as_uuid=True), nullable=False),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("scopes", ARRAY(sa.Text), nullable=False),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
        sa.Column("expires_at", TZ, nullable=False),
        sa.Column("used_at", TZ),
        sa.Column("revoked_at", TZ),
        sa.PrimaryKeyConstraint("token_id", name="pk_refresh_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_refresh_tokens_token_hash"),
    )
    op.create_index("ix_refresh_tokens_family_id", "refresh_tokens", ["family_id"])
    op.create_table(
        "accounts",
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
        sa.Column("display_name", sa.Text, nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("balance_minor", sa.BigInteger, nullable=False),
        sa.Column("overdraft_limit_minor", sa.BigInteger, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("closed_at", TZ),
        sa.PrimaryKeyConstraint("account_id", name="pk_accounts"),
        sa.ForeignKeyConstraint(
            ["currency_code"], ["currencies.code"], name="fk_accounts_currency_code_currencies"
        ),
        sa.CheckConstraint(
            "balance_minor >= -overdraft_limit_minor", name="ck_accounts_within_overdraft"
        ),
        sa.CheckConstraint("overdraft_limit_minor >= 0", name="ck_accounts_overdraft_non_negative"),
        sa.CheckConstraint("state IN ('open', 'closed')", name="ck_accounts_state_known"),
    )
    op.create_index("ix_accounts_owner_created", "accounts", ["owner", "created_at", "account_id"])
    op.create_table(
        "transfers",
        sa.Column("transfer_id", UUID(as_uuid=True), nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("initiated_by", sa.Text, nullable=False),
        sa.Column("source_account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("destination_account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("description", sa.Text, nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("transfer_id", name="pk_transfers"),
        sa.ForeignKeyConstraint(
            ["source_account_id"],
            ["accounts.account_id"],
            name="fk_transfers_source_account_id_accounts",
        ),
        sa.ForeignKeyConstraint(
            ["destination_account_id"],
            ["accounts.account_id"],
            name="fk_transfers_destination_account_id_accounts",
        ),
        sa.ForeignKeyConstraint(
            ["currency_code"], ["currencies.code"], name="fk_transfers_currency_code_currencies"
        ),
        sa.CheckConstraint("amount_minor > 0", name="ck_transfers_amount_positive"),
        sa.CheckConstraint(
            "source_account_id <> destination_account_id", name="ck_transfers_distinct_accounts"
        ),
    )
    op.create_index(
        "ix_transfers_source_created",
        "transfers",
        ["source_account_id", "created_at", "transfer_id"],
    )
    op.create_index(
        "ix_transfers_destination_created",
        "transfers",
        ["destination_account_id", "created_at", "transfer_id"],
    )
    op.create_table(
        "ledger_entries",
        sa.Column("entry_id", UUID(as_uuid=True), nullable=False),
        sa.Column("transfer_id", UUID(as_uuid=True), nullable=False),
        sa.Column("account_id", UUID(as_uuid=True), nullable=False),
        sa.Column("amount_minor", sa.BigInteger, nullable=False),
        sa.Column("currency_code", sa.String(3), nullable=False),
        sa.Column("created_at", TZ, nullable=False),
        sa.PrimaryKeyConstraint("entry_id", name="pk_ledger_entries"),
        sa.ForeignKeyConstraint(
            ["transfer_id"],
            ["transfers.transfer_id"],
            name="fk_ledger_entries_transfer_id_transfers",
        ),
        sa.ForeignKeyConstraint(
            ["account_id"],
            ["accounts.account_id"],
            name="fk_ledger_entries_account_id_accounts",
        ),
        sa.ForeignKeyConstraint(
            ["currency_code"],
            ["currencies.code"],
            name="fk_ledger_entries_currency_code_currencies",
        ),
        sa.CheckConstraint("amount_minor <> 0", name="ck_ledger_entries_amount_non_zero"),
    )
    op.create_index("ix_ledger_entries_transfer_id", "ledger_entries", ["transfer_id"])
    op.create_index("ix_ledger_entries_account_id", "ledger_entries", ["account_id"])
    op.create_table(
        "idempotency_keys",
        sa.Column("principal", sa.Text, nullable=False),
        sa.Column("request_id", sa.Text, nullable=False),
        sa.Column("method", sa.Text, nullable=False),
        sa.Column("fingerprint", BYTEA, nullable=False),
        sa.Column("response", BYTEA, nullable=False),
        sa.Column("created_at", TZ, nullable=False, server_default=NOW),
        sa.PrimaryKeyConstraint("principal", "request_id", name="pk_idempotency_keys"),
    )

    if context.get_context().dialect.name == "postgresql":
        op.execute(APPEND_ONLY)
        op.execute(BALANCED)
        for table in ("ledger_entries", "transfers", "idempotency_keys"):
            op.execute(
                f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
                "FOR EACH ROW EXECUTE FUNCTION meshbank_refuse_change()"
            )
            op.execute(
                f"CREATE TRIGGER {table}_no_truncate BEFORE TRUNCATE ON {table} "
                "FOR EACH STATEMENT EXECUTE FUNCTION meshbank_refuse_change()"
            )
        op.execute(
            "CREATE CONSTRAINT TRIGGER ledger_entries_balanced AFTER INSERT ON ledger_entries "
            "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION meshbank_check_balanced()"
        )


def downgrade() -> None:
    for table in (
        "idempotency_keys",
        "ledger_entries",
        "transfers",
        "accounts",
        "refresh_tokens",
        "signing_keys",
        "partners",
        "users",
        "currencies",
    ):
        op.drop_table(table)
    if context.get_context().dialect.name == "postgresql":
        op.execute("DROP FUNCTION IF EXISTS meshbank_check_balanced()")
        op.execute("DROP FUNCTION IF EXISTS meshbank_refuse_change()")
