"""``pneumo audit export DB --out FOLDER``: the films readers corrected, as class folders for training.

Only images stored by ``serve --keep-images`` can be exported (the trail itself holds no pixels).
Each goes to ``FOLDER/TRUE_LABEL/<sha256>.png``: named by content, so no file name or patient
identifier travels, and each image is its own patient for ``pneumo train``'s split. A film that
readers labelled differently on different readings is left out and reported.
"""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from pneumo.audit.record import images_folder_for, kept_image_path
from pneumo.audit.schema import Reading
from pneumo.audit.summary import latest_feedback, open_existing
from pneumo.errors import PneumoError


def export_corrected(
    db: str | Path, out: str | Path, images: str | Path | None = None, include_agreed: bool = False
) -> dict[str, Any]:
    """Copy the kept images whose latest feedback corrected the model (``include_agreed``: every labelled one)."""
    engine = open_existing(db)
    try:
        folder = Path(images) if images else images_folder_for(engine, None)
        with Session(engine) as session:
            readings = list(session.scalars(select(Reading).where(Reading.image_kept.is_(True))))
            latest = latest_feedback(session, [r.id for r in readings])
    except PneumoError as exc:
        raise PneumoError(f"{exc} (or give --images FOLDER)") from None
    finally:
        engine.dispose()
    labels: dict[str, set[str]] = {}
    for r in readings:
        fb = latest.get(r.id)
        if fb is None or fb.true_label is None or (fb.agreed and not include_agreed):
            continue
        labels.setdefault(r.image_sha256, set()).add(fb.true_label)
    out = Path(out)
    per_class: Counter[str] = Counter()
    notes = []
    for sha, found in sorted(labels.items()):
        if len(found) > 1:
            notes.append(f"image {sha[:12]}: readers gave {sorted(found)}; left out")
            continue
        source = kept_image_path(folder, sha)
        if not source.is_file():
            notes.append(f"image {sha[:12]}: not in {folder}; left out")
            continue
        (label,) = found
        target = out / label / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)
        per_class[label] += 1
    if not readings:
        notes.append("no kept images in the trail: start pneumo serve with --keep-images to collect them")
    return {"out": str(out), "exported": sum(per_class.values()), "per_class": dict(per_class), "notes": notes}
