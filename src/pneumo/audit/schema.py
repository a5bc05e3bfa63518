"""The audit tables, as SQLAlchemy 2 declarative models: what a quality officer can ask of any reading.

Three tables. ``models``: each model that ever read an image, by content (sha256 over its weights and
model.json), with the folder it was loaded from so the summary can find its validation figures.
``readings``: one row per image read, holding the image's content hash but never its pixels, its file
name or anything from its DICOM header. ``feedback``: what a reader said about a reading, appended
(never updated), so the trail keeps every opinion and the summary uses the latest.

The columns of a release are fixed by its Alembic revisions (``audit/migrations``); these models
describe the newest one and must match it (``tests/test_audit_db.py`` compares them).
"""

from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import Boolean, DateTime, Float, ForeignKey, Integer, String, Text, false
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

SHA256_HEX = 64
NOTE_MAX_CHARS = 280


def utc_now() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    pass


class AuditedModel(Base):
    """A model folder as it was when it read images: its content hash is its identity."""

    __tablename__ = "models"

    id: Mapped[str] = mapped_column(String(SHA256_HEX), primary_key=True)  # sha256 of weights + model.json
    arch: Mapped[str] = mapped_column(String(64))
    classes: Mapped[str] = mapped_column(Text)  # JSON list, in the model's order
    positive_class: Mapped[str | None] = mapped_column(String(64))
    threshold_method: Mapped[str | None] = mapped_column(String(64))
    folder: Mapped[str | None] = mapped_column(Text)  # absolute path where it was last loaded from
    first_seen: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)


class Reading(Base):
    """One image read by one model: what it said, at which threshold, how fast; never who it was."""

    __tablename__ = "readings"

    id: Mapped[str] = mapped_column(String(36), primary_key=True)  # a UUID, returned to the caller
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now, index=True)
    model_id: Mapped[str] = mapped_column(ForeignKey("models.id"), index=True)
    pneumo_version: Mapped[str] = mapped_column(String(32))
    runtime: Mapped[str] = mapped_column(String(16))  # torch | onnx
    source: Mapped[str] = mapped_column(String(16))  # serve | predict | dicom | dicomweb
    image_sha256: Mapped[str] = mapped_column(String(SHA256_HEX), index=True)
    width: Mapped[int | None] = mapped_column(Integer)
    height: Mapped[int | None] = mapped_column(Integer)
    image_format: Mapped[str | None] = mapped_column(String(16))  # jpeg | png | dicom
    probability: Mapped[float] = mapped_column(Float)  # of the positive class (of the decision with argmax)
    threshold: Mapped[float | None] = mapped_column(Float)  # None: the model decides by argmax
    decision: Mapped[str] = mapped_column(String(64))
    in_scope: Mapped[bool | None] = mapped_column(Boolean)  # None until the in-scope check reports
    latency_ms: Mapped[float] = mapped_column(Float)
    image_kept: Mapped[bool] = mapped_column(
        Boolean, default=False, server_default=false()
    )  # serve --keep-images stored it
    # the DICOM node: HMAC-SHA256 of the SOP Instance UID under the trail's key (never the UID), and
    # the AE title of the modality or PACS that sent the film
    instance_key: Mapped[str | None] = mapped_column(String(SHA256_HEX), index=True)
    calling_ae: Mapped[str | None] = mapped_column(String(16))

    feedback: Mapped[list[Feedback]] = relationship(back_populates="reading", order_by="Feedback.id")


class Feedback(Base):
    """A reader's verdict on a reading: agreed or not, the true label, a short note (no identifiers)."""

    __tablename__ = "feedback"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    reading_id: Mapped[str] = mapped_column(ForeignKey("readings.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utc_now)
    agreed: Mapped[bool] = mapped_column(Boolean)
    true_label: Mapped[str | None] = mapped_column(String(64))
    note: Mapped[str | None] = mapped_column(String(NOTE_MAX_CHARS))

    reading: Mapped[Reading] = relationship(back_populates="feedback")
