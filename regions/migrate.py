"""Apply the Alembic migrations in ``regions/migrations`` to a database URL."""

from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa
from alembic import command
from alembic.config import Config

MIGRATIONS = Path(__file__).resolve().parent / "migrations"


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return config


def upgrade(url: str, revision: str = "head") -> None:
    """Migrate the database at ``url`` to ``revision``; safe to run on every start."""
    engine = sa.create_engine(url)
    try:
        with engine.begin() as conn:
            config = alembic_config()
            config.attributes["connection"] = conn
            command.upgrade(config, revision)
    finally:
        engine.dispose()


def offline_sql(dialect_name: str, database_name: str = "meshbank") -> str:
    """The SQL every migration would run on ``dialect_name`` (``postgresql`` or
    ``cockroachdb``), without a database: how the CockroachDB DDL is checked here."""
    import io

    if dialect_name == "cockroachdb":
        import sqlalchemy_cockroachdb  # noqa: F401 - registers the dialect

    buffer = io.StringIO()
    config = alembic_config()
    config.output_buffer = buffer
    config.attributes["dialect_name"] = dialect_name
    config.attributes["database_name"] = database_name
    command.upgrade(config, "head", sql=True)
    return buffer.getvalue()


def current(url: str) -> str | None:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("alembic_version"):
                return None
            return conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    finally:
        engine.dispose()
