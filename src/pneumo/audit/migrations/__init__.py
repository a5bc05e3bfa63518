"""Alembic migrations of the audit database, shipped in the package and run by ``audit.db.open_database``."""
