"""Recording readings and readers' feedback: the API ``serve`` and ``predict`` call.

A reading row holds what a quality officer needs to reconstruct a decision (which model, which
pneumo, which runtime, the image's content hash, its size and format, the probability, threshold and
decision, the in-scope flag, the latency) and nothing that identifies a patient: no pixels, no file
name, no DICOM header value. Images are stored only with ``serve --keep-images``, re-encoded from
their pixels as PNG (so no EXIF or DICOM tag survives), in a content-addressed folder beside the
database, for ``pneumo audit export``.

Each call commits before it returns: an answer the caller has seen always has its row.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import re
import secrets
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy import Engine
from sqlalchemy.orm import Session

from pneumo.audit.db import open_database, sqlite_file
from pneumo.audit.schema import NOTE_MAX_CHARS, AuditedModel, Feedback, Reading
from pneumo.data.imaging import open_image, to_grey_uint8
from pneumo.errors import PneumoError
from pneumo.infer.runtime import open_chosen, runtime_of
from pneumo.io_utils import atomic_write
from pneumo.model_meta import ModelMeta, model_folder, read_model_meta
from pneumo.version import __version__

IMAGES_FOLDER = "audit_images"  # beside the SQLite file: IMAGES_FOLDER/ab/abcdef....png
KEY_FILE = "audit.key"  # beside the SQLite file (or in the model folder for PostgreSQL): the instance-key secret
KEY_ENV = "PNEUMO_AUDIT_KEY"  # hex; overrides the file (several nodes writing one PostgreSQL trail share it)
# A note is free text typed next to a patient's film: refuse what looks like an identifier or a date.
IDENTIFIER_LIKE = re.compile(r"\d{5,}|\b\d{1,4}[-/.]\d{1,2}[-/.]\d{1,4}\b")


class UnknownReading(PneumoError):
    """Feedback names a reading id the database does not hold."""


class FeedbackError(PneumoError):
    """Feedback that cannot be stored as given (a label the model does not know, a note too long ...)."""


@dataclass(frozen=True)
class ImageFacts:
    """What the trail keeps about an image: its content hash, size and format. Never its name."""

    sha256: str
    width: int | None
    height: int | None
    format: str | None


def image_format(data: bytes) -> str | None:
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[128:132] == b"DICM":
        return "dicom"
    return None


def image_facts(data: bytes, size: tuple[int, int] | None = None) -> ImageFacts:
    """Hash, size and format of uploaded bytes; the size from the header when the caller has none."""
    fmt = image_format(data)
    if size is None and fmt in ("jpeg", "png"):
        try:
            with Image.open(io.BytesIO(data)) as probe:  # the header only: no pixels decoded
                size = probe.size
        except Exception:  # noqa: BLE001 - a size is nice to have; the reading itself succeeded
            size = None
    width, height = size if size else (None, None)
    return ImageFacts(hashlib.sha256(data).hexdigest(), width, height, fmt)


def _hash_file(digest: Any, path: Path) -> None:
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)


def model_identity(folder: str | Path) -> str:
    """sha256 over model.safetensors and model.json (an ensemble: model.json and each member's identity)."""
    folder = model_folder(folder)
    digest = hashlib.sha256()
    meta_file, weights_file = folder / "model.json", folder / "model.safetensors"
    _hash_file(digest, meta_file)
    if weights_file.is_file():
        _hash_file(digest, weights_file)
    else:
        for member in json.loads(meta_file.read_text()).get("members", []):
            digest.update(model_identity(folder / member).encode())
    return digest.hexdigest()


def images_folder_for(engine: Engine, model_dir: str | Path | None) -> Path:
    """Where kept images go: beside the SQLite file, or in the model folder for PostgreSQL."""
    path = sqlite_file(engine.url.render_as_string(hide_password=False))
    if path is not None:
        return path.parent / IMAGES_FOLDER
    if model_dir is None:
        raise PneumoError("--keep-images with a PostgreSQL audit database needs the model folder")
    return model_folder(model_dir) / IMAGES_FOLDER


def audit_key(engine: Engine, model_dir: str | Path) -> bytes:
    """The secret under which DICOM instance UIDs are hashed: ``$PNEUMO_AUDIT_KEY`` (hex), else
    ``audit.key`` beside the SQLite file (in the model folder for PostgreSQL), made on first use (32
    random bytes, mode 0600). Without the key a hash cannot be checked against a guessed UID; with
    it, a quality officer holding a UID can find its reading (``instance_key``)."""
    if os.environ.get(KEY_ENV):
        try:
            return bytes.fromhex(os.environ[KEY_ENV])
        except ValueError:
            raise PneumoError(f"${KEY_ENV} must be hexadecimal (e.g. from: openssl rand -hex 32)") from None
    path = sqlite_file(engine.url.render_as_string(hide_password=False))
    path = (path.parent if path is not None else model_folder(model_dir)) / KEY_FILE
    if not path.is_file():
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            pass  # another node made it a moment ago
        else:
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_hex(32) + "\n")
                f.flush()
                os.fsync(f.fileno())
    try:
        return bytes.fromhex(path.read_text().strip())
    except (OSError, ValueError) as exc:
        raise PneumoError(f"{path}: cannot read the audit key ({exc})") from None


def instance_key(key: bytes, uid: str) -> str:
    """HMAC-SHA256 of a DICOM UID under the trail's key: what the trail keeps instead of the UID."""
    return hmac.new(key, uid.encode(), hashlib.sha256).hexdigest()


def kept_image_path(images: Path, sha256: str) -> Path:
    return images / sha256[:2] / f"{sha256}.png"


class AuditTrail:
    """The audit database as one model's recorder: register the model once, then one row per reading."""

    def __init__(
        self,
        engine: Engine,
        meta: ModelMeta,
        folder: str | Path,
        runtime: str = "torch",
        images: Path | None = None,
    ):
        self.engine, self.meta, self.runtime, self.images = engine, meta, runtime, images
        self.folder = model_folder(folder).resolve()
        self.model_id = model_identity(self.folder)
        self._register_model()

    @classmethod
    def open(
        cls,
        db: str | Path | None,
        model_dir: str | Path,
        keep_images: bool = False,
        runtime: str = "torch",
    ) -> AuditTrail:
        """The trail of ``model_dir`` in ``db`` (default ``MODEL/audit.sqlite``), migrated to the newest schema.

        Only model.json is read (the decision rule and the classes): the caller loads the network.
        """
        folder = model_folder(model_dir)
        meta = read_model_meta(folder / "model.json")
        engine = open_database(db, folder)
        images = images_folder_for(engine, folder) if keep_images else None
        return cls(engine, meta, folder, runtime=runtime, images=images)

    def close(self) -> None:
        self.engine.dispose()

    @property
    def key(self) -> bytes:
        """The instance-key secret (``audit_key``), read on first use."""
        if getattr(self, "_key", None) is None:
            self._key = audit_key(self.engine, self.folder)
        return self._key

    def _register_model(self) -> None:
        meta = self.meta
        with Session(self.engine) as session, session.begin():
            known = session.get(AuditedModel, self.model_id)
            if known is None:
                session.add(
                    AuditedModel(
                        id=self.model_id,
                        arch=meta.arch,
                        classes=json.dumps(list(meta.classes)),
                        positive_class=meta.positive_class if meta.positive_index is not None else None,
                        threshold_method=meta.threshold_method,
                        folder=str(self.folder),
                    )
                )
            elif known.folder != str(self.folder):
                known.folder = str(self.folder)  # the same model moved: the summary looks here now

    def _reading(
        self,
        facts: ImageFacts,
        probabilities: Sequence[float],
        latency_ms: float,
        source: str,
        in_scope: bool | None,
        kept: bool,
        instance: str | None = None,
        calling_ae: str | None = None,
    ) -> Reading:
        probs = np.asarray([probabilities], dtype=np.float64)
        meta = self.meta
        decided = int(meta.decide(probs)[0])  # the one decision rule, as the answer was made
        shown = meta.positive_index if meta.positive_index is not None else decided
        return Reading(
            id=str(uuid.uuid4()),
            model_id=self.model_id,
            pneumo_version=__version__,
            runtime=self.runtime,
            source=source,
            image_sha256=facts.sha256,
            width=facts.width,
            height=facts.height,
            image_format=facts.format,
            probability=float(probs[0, shown]),
            threshold=meta.operating_threshold,
            decision=meta.classes[decided],
            in_scope=in_scope,
            latency_ms=float(latency_ms),
            image_kept=kept,
            instance_key=None if instance is None else instance_key(self.key, instance),
            calling_ae=calling_ae,
        )

    def record_reading(
        self,
        data: bytes,
        probabilities: Sequence[float],
        latency_ms: float,
        source: str = "serve",
        size: tuple[int, int] | None = None,
        in_scope: bool | None = None,
        instance: str | None = None,
        calling_ae: str | None = None,
    ) -> str:
        """Store one reading (and its image with --keep-images); return its id once committed.

        ``instance``: a DICOM SOP Instance UID, stored only as its keyed hash (``instance_key``);
        ``calling_ae``: the AE title of the node that sent it."""
        facts = image_facts(data, size)
        kept = self.images is not None and self._keep_image(data, facts.sha256)
        reading = self._reading(facts, probabilities, latency_ms, source, in_scope, kept, instance, calling_ae)
        reading_id = reading.id
        with Session(self.engine) as session, session.begin():
            session.add(reading)
        return reading_id

    def record_files(self, rows: Sequence[Mapping[str, Any]], seconds: float, source: str = "predict") -> list[str]:
        """Store ``pneumo predict`` rows (one transaction); latency is the run's time per image read."""
        good = [r for r in rows if "error" not in r]
        latency = 1000 * seconds / max(1, len(rows))
        readings = []
        for row in good:
            data = Path(row["path"]).read_bytes()
            probs = [row[f"p_{c}"] for c in self.meta.classes]
            readings.append(self._reading(image_facts(data), probs, latency, source, row.get("in_scope"), False))
        ids = [r.id for r in readings]
        with Session(self.engine) as session, session.begin():
            session.add_all(readings)
        return ids

    def _keep_image(self, data: bytes, sha256: str) -> bool:
        """Write the image's pixels as PNG (no metadata) under its upload's hash; False if undecodable."""
        target = kept_image_path(self.images, sha256)
        if target.exists():
            return True
        try:
            grey = Image.fromarray(to_grey_uint8(open_image(data)), mode="L")
        except PneumoError:
            return False
        buf = io.BytesIO()
        grey.save(buf, format="PNG")
        atomic_write(target, lambda tmp: tmp.write_bytes(buf.getvalue()))
        return True

    def record_feedback(
        self, reading_id: str, agreed: bool, true_label: str | None = None, note: str | None = None
    ) -> dict[str, Any]:
        """Append a reader's verdict on a reading; the label must be one of the reading model's classes."""
        note = (note or "").strip() or None
        if note is not None:
            if len(note) > NOTE_MAX_CHARS:
                raise FeedbackError(f"note too long ({len(note)} characters; at most {NOTE_MAX_CHARS})")
            if IDENTIFIER_LIKE.search(note):
                raise FeedbackError(
                    "the note looks like it holds an identifier or a date; the audit trail keeps no patient "
                    "identifiers: describe the finding only"
                )
        with Session(self.engine) as session, session.begin():
            reading = session.get(Reading, reading_id)
            if reading is None:
                raise UnknownReading(f"no reading {reading_id!r} in the audit database")
            classes = json.loads(session.get(AuditedModel, reading.model_id).classes)
            if true_label is None and not agreed and len(classes) == 2:
                true_label = next(c for c in classes if c != reading.decision)
            if true_label is None and agreed:
                true_label = reading.decision
            if true_label is not None and true_label not in classes:
                raise FeedbackError(f"true label {true_label!r} is not one of the model's classes {classes}")
            if true_label is not None and agreed != (true_label == reading.decision):
                raise FeedbackError(
                    f"{'agreed' if agreed else 'disagreed'} with {reading.decision} but gave the true label "
                    f"{true_label}: these contradict each other"
                )
            entry = Feedback(reading_id=reading_id, agreed=agreed, true_label=true_label, note=note)
            session.add(entry)
            session.flush()
            return {"id": entry.id, "reading_id": reading_id, "agreed": agreed, "true_label": true_label}


def predict_and_record(
    model: str | Path,
    paths: Sequence[str | Path],
    db: str | Path | None = None,
    tta: bool = False,
    progress: bool = True,
    runtime: str = "auto",
    loaded: Any = None,
) -> list[dict]:
    """``pneumo predict`` with every successful reading recorded in the audit trail, under the runtime
    that read it; ``loaded``: the model already opened (``infer.runtime.open_chosen``)."""
    from pneumo.infer.predict import predict_files

    folder = model_folder(model)
    trail = AuditTrail.open(db, folder)  # first: a database that cannot be opened fails before any work
    try:
        loaded = loaded if loaded is not None else open_chosen(folder, runtime, tta=tta)[0]
        trail.runtime = runtime_of(loaded)
        start = time.perf_counter()
        rows = predict_files(loaded, paths, tta=tta, progress=progress)
        trail.record_files(rows, time.perf_counter() - start)
    finally:
        trail.close()
    return rows
