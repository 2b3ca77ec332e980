"""Alembic environment: online against the connection given by ``regions.migrate``, or
offline (``--sql``) for a dialect name, to show the DDL a database would get."""

from __future__ import annotations

from alembic import context

from services.common.schema import metadata

config = context.config
if context.is_offline_mode():
    context.configure(
        dialect_name=config.attributes.get("dialect_name", "postgresql"),
        target_metadata=metadata,
        literal_binds=True,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()
else:
    context.configure(
        connection=config.attributes["connection"],
        target_metadata=metadata,
        transaction_per_migration=True,
    )
    with context.begin_transaction():
        context.run_migrations()
