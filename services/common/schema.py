"""The database schema as SQLAlchemy Core tables: one MetaData for every service.

Alembic migrations in ``regions/migrations`` create exactly this schema (a test compares
the migrated database with this MetaData). Column types are chosen to mean the same
on PostgreSQL and CockroachDB: UUID keys (no sequences, which serialise writes on
CockroachDB), BIGINT minor units, TIMESTAMPTZ.
"""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import ARRAY, BYTEA, JSONB, UUID

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

NOW = sa.text("now()")

# Reference data, read everywhere, written rarely (GLOBAL on CockroachDB).
currencies = sa.Table(
    "currencies",
    metadata,
    sa.Column("code", sa.String(3), primary_key=True),
    sa.Column("minor_units", sa.SmallInteger, nullable=False),
    sa.Column("name", sa.Text, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    sa.Column("user_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("username", sa.Text, nullable=False, unique=True),
    sa.Column("password_hash", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
)

partners = sa.Table(
    "partners",
    metadata,
    sa.Column("partner_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("name", sa.Text, nullable=False, unique=True),
    sa.Column("client_id", sa.Text, nullable=False, unique=True),
    # SHA-256 of a 256-bit random secret: a slow hash adds nothing against guessing
    # a secret with that much entropy (passwords, which have little, use Argon2id).
    sa.Column("secret_hash", BYTEA, nullable=False),
    sa.Column("scopes", ARRAY(sa.Text), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
)

signing_keys = sa.Table(
    "signing_keys",
    metadata,
    sa.Column("kid", sa.Text, primary_key=True),
    sa.Column("algorithm", sa.Text, nullable=False),
    # PKCS#8 PEM encrypted with the deployment's key passphrase (never stored here).
    sa.Column("private_key_pem", sa.Text, nullable=False),
    sa.Column("public_jwk", JSONB, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
    sa.Column("retired_at", sa.DateTime(timezone=True)),
)

refresh_tokens = sa.Table(
    "refresh_tokens",
    metadata,
    sa.Column("token_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("token_hash", BYTEA, nullable=False, unique=True),
    sa.Column("family_id", UUID(as_uuid=True), nullable=False, index=True),
    sa.Column("subject", sa.Text, nullable=False),
    sa.Column("scopes", ARRAY(sa.Text), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
    sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("used_at", sa.DateTime(timezone=True)),
    sa.Column("revoked_at", sa.DateTime(timezone=True)),
)

accounts = sa.Table(
    "accounts",
    metadata,
    sa.Column("account_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("display_name", sa.Text, nullable=False),
    sa.Column("currency_code", sa.String(3), sa.ForeignKey("currencies.code"), nullable=False),
    sa.Column("balance_minor", sa.BigInteger, nullable=False),
    sa.Column("overdraft_limit_minor", sa.BigInteger, nullable=False),
    sa.Column("state", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("closed_at", sa.DateTime(timezone=True)),
    # The owner's region when the account was opened (CockroachDB: REGIONAL BY ROW).
    sa.Column("home_region", sa.Text, nullable=False),
    # The last line of defence against overdrafts, whatever the code above does.
    sa.CheckConstraint("balance_minor >= -overdraft_limit_minor", name="within_overdraft"),
    sa.CheckConstraint("overdraft_limit_minor >= 0", name="overdraft_non_negative"),
    sa.CheckConstraint("state IN ('open', 'closed')", name="state_known"),
    sa.Index("ix_accounts_owner_created", "owner", "created_at", "account_id"),
)

transfers = sa.Table(
    "transfers",
    metadata,
    sa.Column("transfer_id", UUID(as_uuid=True), primary_key=True),
    sa.Column("request_id", sa.Text, nullable=False),
    sa.Column("initiated_by", sa.Text, nullable=False),
    sa.Column(
        "source_account_id",
        UUID(as_uuid=True),
        sa.ForeignKey("accounts.account_id"),
        nullable=False,
    ),
    sa.Column(
        "destination_account_id",
        UUID(as_uuid=True),
        sa.ForeignKey("accounts.account_id"),
        nullable=False,
    ),
    sa.Column("amount_minor", sa.BigInteger, nullable=False),
    sa.Column("currency_code", sa.String(3), sa.ForeignKey("currencies.code"), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("amount_minor > 0", name="amount_positive"),
    sa.CheckConstraint("source_account_id <> destination_account_id", name="distinct_accounts"),
    sa.Index("ix_transfers_source_created", "source_account_id", "created_at", "transfer_id"),
    sa.Index(
        "ix_transfers_destination_created", "destination_account_id", "created_at", "transfer_id"
    ),
)

# Append-only: triggers created by the migration refuse UPDATE, DELETE and TRUNCATE,
# and a deferred constraint trigger refuses a commit whose entries for a transfer do
# not sum to zero.
ledger_entries = sa.Table(
    "ledger_entries",
    metadata,
    sa.Column("entry_id", UUID(as_uuid=True), primary_key=True),
    sa.Column(
        "transfer_id",
        UUID(as_uuid=True),
        sa.ForeignKey("transfers.transfer_id"),
        nullable=False,
        index=True,
    ),
    sa.Column(
        "account_id",
        UUID(as_uuid=True),
        sa.ForeignKey("accounts.account_id"),
        nullable=False,
        index=True,
    ),
    sa.Column("amount_minor", sa.BigInteger, nullable=False),
    sa.Column("currency_code", sa.String(3), sa.ForeignKey("currencies.code"), nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.CheckConstraint("amount_minor <> 0", name="amount_non_zero"),
)

# AIP-155 request ids, written in the same transaction as the effect they guard.
idempotency_keys = sa.Table(
    "idempotency_keys",
    metadata,
    sa.Column("principal", sa.Text, primary_key=True),
    sa.Column("request_id", sa.Text, primary_key=True),
    sa.Column("method", sa.Text, nullable=False),
    sa.Column("fingerprint", BYTEA, nullable=False),
    sa.Column("response", BYTEA, nullable=False),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=NOW),
)
