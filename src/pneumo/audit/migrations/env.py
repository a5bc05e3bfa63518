"""Alembic's environment: migrate the connection ``audit.db.upgrade`` hands over (never a URL from a file)."""

from __future__ import annotations

from alembic import context

from pneumo.audit.schema import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
)
with context.begin_transaction():
    context.run_migrations()
