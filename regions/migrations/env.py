"""Alembic environment: migrations run online against the URL given by ``regions.migrate``."""

from __future__ import annotations

from alembic import context

from services.common.schema import metadata

config = context.config
connectable = config.attributes["connection"]
context.configure(connection=connectable, target_metadata=metadata, transaction_per_migration=True)
with context.begin_transaction():
    context.run_migrations()
