"""The audit trail: every reading recorded (SQLAlchemy + Alembic), readers' feedback, the summary and drift."""
