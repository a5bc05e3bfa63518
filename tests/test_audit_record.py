"""The audit trail on SQLite: what a reading row holds (and never holds), feedback, summary, drift, export.

Models here are untrained lite0 networks at 32 px: the trail records whatever a model says, so no
training is needed, and the figures the summary reports are checked against hand-made readings.
"""

from __future__ import annotations

import hashlib
import io
import json
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from conftest import SAMPLE_ROOT, one_torch_thread
from pneumo.audit.export import export_corrected
from pneumo.audit.record import AuditTrail, FeedbackError, UnknownReading, image_facts, model_identity
from pneumo.audit.summary import format_summary, summarise
from pneumo.cli import main
from pneumo.data.folders import discover
from pneumo.errors import PneumoError
from pneumo.evaluation.metrics import binary_metrics
from pneumo.infer.model_folder import ModelMeta, save_model
from pneumo.nets.models import create_model
from pneumo.run_folder import RunFolder, ValidPredictions
from pneumo.serve.app import check_access, create_app

CLASSES = ["NORMAL", "PNEUMONIA"]
KERMANY_NAME = "person1234_bacteria_5678.jpeg"


def make_model_folder(run: Path, threshold: float = 0.5, seed: int = 0) -> Path:
    """RUN/model with an untrained 32 px lite0 and RUN/valid_predictions.csv: p(PNEUMONIA) evenly over [0, 1]."""
    import torch

    torch.manual_seed(seed)
    meta = ModelMeta(
        arch="efficientnet_lite0", classes=CLASSES, image_size=32, threshold=threshold, positive_class="PNEUMONIA"
    )
    save_model(create_model("efficientnet_lite0", pretrained="none"), meta, run / "model")
    p = np.linspace(0.0, 1.0, 201)
    RunFolder(run).write_predictions(
        ValidPredictions(
            CLASSES,
            [f"v{i}.png" for i in range(p.size)],
            (p >= 0.5).astype(int),
            [f"v{i}" for i in range(p.size)],
            np.stack([1 - p, p], axis=1),
        )
    )
    return run / "model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with one_torch_thread():
        return make_model_folder(tmp_path_factory.mktemp("audit-run"))


def jpeg_bytes(value: int = 100, size: tuple[int, int] = (40, 30), comment: bytes = b"") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full(size[::-1], value, np.uint8)).save(buf, format="JPEG", comment=comment)
    return buf.getvalue()


def rows(db: Path, sql: str) -> list[tuple]:
    with sqlite3.connect(db) as c:
        return c.execute(sql).fetchall()


def test_a_reading_row_holds_the_decision_and_no_identity(model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "audit.sqlite"
    trail = AuditTrail.open(db, model_dir)
    data = jpeg_bytes(comment=b"Doe^Jane 1984-02-03 ID 99812345")
    reading_id = trail.record_reading(data, [0.3, 0.7], latency_ms=41.5, size=(40, 30))
    trail.close()
    (row,) = rows(db, "select * from readings")
    columns = [c[1] for c in rows(db, "pragma table_info(readings)")]
    got = dict(zip(columns, row))
    weights = (model_dir / "model.json").read_bytes() + (model_dir / "model.safetensors").read_bytes()
    assert got["id"] == reading_id
    assert got["model_id"] == hashlib.sha256(weights).hexdigest() == model_identity(model_dir)
    assert got["image_sha256"] == hashlib.sha256(data).hexdigest()
    assert (got["width"], got["height"], got["image_format"]) == (40, 30, "jpeg")
    assert got["probability"] == pytest.approx(0.7) and got["threshold"] == 0.5 and got["decision"] == "PNEUMONIA"
    assert got["runtime"] == "torch" and got["source"] == "serve" and got["in_scope"] is None
    assert got["latency_ms"] == 41.5 and got["pneumo_version"]
    created = datetime.fromisoformat(got["created_at"]).replace(tzinfo=timezone.utc)
    assert abs(created - datetime.now(timezone.utc)) < timedelta(minutes=5)  # stored in UTC
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("audit.sqlite*"))
    for secret in (b"Doe", b"1984-02-03", b"99812345"):  # carried in the JPEG comment, never stored
        assert secret not in raw


def test_sqlite_is_in_wal_mode_and_durable_settings(model_dir: Path, tmp_path: Path) -> None:
    trail = AuditTrail.open(tmp_path / "a.sqlite", model_dir)
    with trail.engine.connect() as c:
        assert c.exec_driver_sql("pragma journal_mode").scalar() == "wal"
        assert c.exec_driver_sql("pragma synchronous").scalar() == 1  # NORMAL: survives a killed process
        assert c.exec_driver_sql("pragma foreign_keys").scalar() == 1
    trail.close()


def test_predict_records_every_read_file_and_no_file_name(model_dir: Path, tmp_path: Path, capsys) -> None:
    images = tmp_path / "in"
    images.mkdir()
    named = images / KERMANY_NAME
    named.write_bytes((SAMPLE_ROOT / "test" / "PNEUMONIA").glob("*.jpeg").__next__().read_bytes())
    (images / "IM-0001-0001.png").write_bytes(jpeg_bytes(180))  # wrong suffix: still read (by content)
    (images / "broken.jpeg").write_bytes(b"\xff\xd8\xff" + bytes(50))
    db = tmp_path / "trail.sqlite"
    assert main(["predict", str(model_dir), str(images), "--json", "--db", str(db)]) == 0
    answered = [r for r in json.loads(capsys.readouterr().out) if "error" not in r]
    recorded = rows(db, "select image_sha256, decision, probability, source from readings order by probability")
    assert len(recorded) == len(answered) == 2
    expected = sorted((r["p_PNEUMONIA"], r["label"]) for r in answered)
    assert [(pytest.approx(p), d) for _, d, p, _ in recorded] == [(pytest.approx(p), d) for p, d in expected]
    assert {s for *_, s in recorded} == {"predict"}
    assert hashlib.sha256(named.read_bytes()).hexdigest() in {h for h, *_ in recorded}
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("trail.sqlite*"))
    for secret in (b"person1234", b"bacteria", b"IM-0001", str(tmp_path).encode()):
        assert secret not in raw
    assert main(["predict", str(model_dir), str(images), "--json", "--db", str(db), "--no-audit"]) == 0
    assert len(rows(db, "select id from readings")) == 2  # --no-audit: nothing added


def test_dicom_upload_keeps_no_tag_value(model_dir: Path, tmp_path: Path) -> None:
    pydicom = pytest.importorskip("pydicom", reason="the dicom extra is not installed")
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = generate_uid(), generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Doe^Jane", "PID-77123", "19840203"
    ds.InstitutionName, ds.AccessionNumber = "St Elsewhere", "ACC4455"
    ds.Rows, ds.Columns, ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 16, 12, 11
    ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PixelRepresentation = 1, "MONOCHROME2", 0
    ds.PixelData = np.arange(64, dtype=np.uint16).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    data = buf.getvalue()
    facts = image_facts(data)
    assert facts.format == "dicom" and facts.sha256 == hashlib.sha256(data).hexdigest()
    db = tmp_path / "d.sqlite"
    trail = AuditTrail.open(db, model_dir)
    trail.record_reading(data, [0.9, 0.1], 10.0, size=(8, 8))
    trail.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("d.sqlite*"))
    for secret in (b"Doe", b"PID-77123", b"19840203", b"Elsewhere", b"ACC4455"):
        assert secret not in raw


def test_feedback_is_checked_and_appended(model_dir: Path, tmp_path: Path) -> None:
    trail = AuditTrail.open(tmp_path / "f.sqlite", model_dir)
    rid = trail.record_reading(jpeg_bytes(), [0.8, 0.2], 5.0)  # NORMAL
    assert trail.record_feedback(rid, agreed=False)["true_label"] == "PNEUMONIA"  # implied with two classes
    assert trail.record_feedback(rid, agreed=True, note="clear lungs")["true_label"] == "NORMAL"
    with pytest.raises(UnknownReading, match="no reading"):
        trail.record_feedback("not-a-reading", agreed=True)
    with pytest.raises(FeedbackError, match="not one of the model's classes"):
        trail.record_feedback(rid, agreed=False, true_label="COVID")
    with pytest.raises(FeedbackError, match="contradict"):
        trail.record_feedback(rid, agreed=True, true_label="PNEUMONIA")
    for note in ("seen 2024-03-05", "patient 1234567", "x" * 300):
        with pytest.raises(FeedbackError):
            trail.record_feedback(rid, agreed=True, note=note)
    trail.close()
    assert rows(tmp_path / "f.sqlite", "select agreed, true_label, note from feedback order by id") == [
        (0, "PNEUMONIA", None),
        (1, "NORMAL", "clear lungs"),
    ]


def test_summary_figures_against_readers_and_weekly_drift(model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "s.sqlite"
    trail = AuditTrail.open(db, model_dir)
    # week 1: like validation (half positive, mean 0.5)
    # readers: 4 true positives, 1 missed, 4 true negatives, 1 false alarm
    week1 = [0.9, 0.8, 0.7, 0.6, 0.3, 0.1, 0.2, 0.3, 0.4, 0.55]
    truth = ["PNEUMONIA"] * 5 + ["NORMAL"] * 4 + ["NORMAL"]
    ids = [trail.record_reading(jpeg_bytes(i), [1 - p, p], 20.0 + i) for i, p in enumerate(week1)]
    for rid, p, label in zip(ids, week1, truth):
        decided = "PNEUMONIA" if p >= 0.5 else "NORMAL"
        trail.record_feedback(rid, agreed=label == decided, true_label=label)
    # week 2: everything called positive with high probability: drift
    week2 = [trail.record_reading(jpeg_bytes(100 + i), [0.05, 0.95], 30.0) for i in range(12)]
    trail.close()
    with sqlite3.connect(db) as c:
        c.execute("update readings set created_at = '2026-03-03 10:00:00.000000'")
        c.executemany("update readings set created_at = '2026-03-11 10:00:00' where id = ?", [(i,) for i in week2])
    report = summarise(db)
    (m,) = report["models"]
    assert m["readings"] == 22 and m["decisions"]["PNEUMONIA"]["n"] == 4 + 1 + 12
    readers = m["readers"]
    assert readers["readings_with_feedback"] == 10 and readers["agreed"] == 8 and readers["agreement"] == 0.8
    expected = binary_metrics(np.array(week1), np.array([CLASSES.index(t) for t in truth]), 0.5, 1)
    assert readers["metrics"]["sensitivity"] == expected["sensitivity"] == 0.8
    assert readers["metrics"]["specificity"] == expected["specificity"] == 0.8
    lo, hi = readers["ci"]["sensitivity"]
    assert 0 <= lo <= 0.8 <= hi <= 1 and hi - lo > 0.1
    drift = m["drift"]
    assert drift["reference"]["positive_rate"] == pytest.approx(101 / 201)
    assert drift["reference"]["mean_probability"] == pytest.approx(0.5)
    w1, w2 = drift["weeks"]
    assert (w1["week"], w1["n"], w1["flagged"]) == ("2026-W10", 10, [])
    assert (w2["week"], w2["n"]) == ("2026-W11", 12)
    assert w2["positive_rate"] == 1.0 and w2["flagged"] == ["positive_rate", "mean_probability"]
    assert w2["positive_rate_limits"][1] < 1.0
    text = format_summary(report)
    assert "FLAGGED" in text and "sensitivity  80.0% (95% CI" in text and "2026-W11" in text
    assert main(["audit", str(db), "--json"]) == 0


def test_summary_says_when_the_model_folder_is_unknown(model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "u.sqlite"
    trail = AuditTrail.open(db, model_dir)
    trail.record_reading(jpeg_bytes(), [0.5, 0.5], 1.0)
    trail.close()
    with sqlite3.connect(db) as c:
        c.execute("update models set folder = ?", (str(tmp_path / "moved"),))
    (m,) = summarise(db)["models"]
    assert m["drift"]["reference"] is None and "not found" in m["drift"]["note"]
    assert m["drift"]["weeks"][0]["flagged"] == []
    (m,) = summarise(db, model_dir=model_dir)["models"]  # pointed at it: the reference is back
    assert m["drift"]["reference"]["n"] == 201
    with pytest.raises(PneumoError, match="no audit database"):
        summarise(tmp_path / "missing.sqlite")


def test_export_writes_corrected_images_as_class_folders(model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "e.sqlite"
    trail = AuditTrail.open(db, model_dir, keep_images=True)
    corrected = trail.record_reading(jpeg_bytes(10, comment=b"Doe^Jane"), [0.9, 0.1], 1.0)
    confirmed = trail.record_reading(jpeg_bytes(20), [0.2, 0.8], 1.0)
    trail.record_reading(jpeg_bytes(30), [0.2, 0.8], 1.0)  # no feedback
    trail.record_feedback(corrected, agreed=False, true_label="PNEUMONIA", note="missed consolidation")
    trail.record_feedback(confirmed, agreed=True)
    trail.close()
    kept = sorted((tmp_path / "audit_images").rglob("*.png"))
    assert len(kept) == 3 and all(b"Doe" not in p.read_bytes() for p in kept)
    out = tmp_path / "corrected"
    result = export_corrected(db, out)
    assert result["exported"] == 1 and result["per_class"] == {"PNEUMONIA": 1}
    (image,) = (out / "PNEUMONIA").iterdir()
    assert image.name == hashlib.sha256(jpeg_bytes(10, comment=b"Doe^Jane")).hexdigest() + ".png"
    assert Image.open(image).size == (40, 30)
    assert main(["audit", "export", str(db), "--out", str(tmp_path / "all"), "--include-agreed"]) == 0
    assert sorted(p.parent.name for p in (tmp_path / "all").rglob("*.png")) == ["PNEUMONIA", "PNEUMONIA"]
    trail = AuditTrail.open(db, model_dir, keep_images=True)  # a missed normal film too: both classes
    trail.record_feedback(trail.record_reading(jpeg_bytes(40), [0.1, 0.9], 1.0), agreed=False)
    trail.close()
    export_corrected(db, out)
    found = discover(out)  # what pneumo train reads
    assert found.classes == CLASSES and len(found.split(found.splits[0])) == 2


def test_serve_returns_the_reading_id_and_takes_feedback(model_dir: Path, tmp_path: Path) -> None:
    db = tmp_path / "serve.sqlite"
    app = create_app(model_dir, audit=AuditTrail.open(db, model_dir))
    with one_torch_thread(), TestClient(app) as client:
        assert client.get("/api/access").json() == {"token_required": False, "audit": True, "keep_images": False}
        data = jpeg_bytes(90)
        r = client.post("/api/predict", files={"file": (KERMANY_NAME, data, "image/jpeg")}, params={"heatmap": "0"})
        assert r.status_code == 200, r.text
        body = r.json()
        (row,) = rows(db, "select id, decision, probability, width from readings")
        assert row == (body["reading_id"], body["label"], pytest.approx(body["probabilities"]["PNEUMONIA"]), 40)
        verdict = {"reading_id": body["reading_id"], "agreed": False, "note": "effusion"}
        assert client.post("/api/feedback", json=verdict).status_code == 200
        assert client.post("/api/feedback", json={**verdict, "reading_id": "nope"}).status_code == 404
        r = client.post("/api/feedback", json={**verdict, "true_label": "COVID"})
        assert r.status_code == 422 and "COVID" in r.json()["detail"]
    assert rows(db, "select agreed, note from feedback") == [(0, "effusion")]
    assert KERMANY_NAME.encode() not in b"".join(p.read_bytes() for p in tmp_path.glob("serve.sqlite*"))


def test_without_audit_there_is_no_reading_id_nor_feedback_route(model_dir: Path) -> None:
    with one_torch_thread(), TestClient(create_app(model_dir)) as client:
        r = client.post("/api/predict", files={"file": ("x.jpeg", jpeg_bytes(), "image/jpeg")}, params={"heatmap": "0"})
        assert r.status_code == 200 and r.json()["reading_id"] is None
        assert client.post("/api/feedback", json={"reading_id": "x", "agreed": True}).status_code == 404


def test_token_guards_the_api_and_off_loopback_needs_one(model_dir: Path) -> None:
    with pytest.raises(PneumoError, match="--token or the PNEUMO_TOKEN"):
        check_access("0.0.0.0", None)
    check_access("127.0.0.1", None)
    check_access("0.0.0.0", "s3cret")
    with TestClient(create_app(model_dir, token="s3cret")) as client:
        assert client.get("/api/access").json()["token_required"] is True
        assert client.get("/").status_code == 200  # the page itself, which asks for the token
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            r = client.get("/api/model", headers=headers)
            assert r.status_code == 401 and "access token" in r.json()["detail"]
            assert r.headers["x-content-type-options"] == "nosniff"  # the security headers on a refusal too
        assert client.get("/api/model", headers={"authorization": "Bearer s3cret"}).status_code == 200


def test_serve_cli_refuses_a_public_host_without_a_token(model_dir: Path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("PNEUMO_TOKEN", raising=False)
    assert main(["serve", str(model_dir), "--host", "0.0.0.0", "--no-audit"]) == 2
    assert "access token" in capsys.readouterr().err


def test_a_reading_that_cannot_be_recorded_is_not_answered(model_dir: Path, tmp_path: Path) -> None:
    trail = AuditTrail.open(tmp_path / "full.sqlite", model_dir)
    with sqlite3.connect(tmp_path / "full.sqlite") as c:  # the database refuses every new reading
        c.execute("create trigger refuse before insert on readings begin select raise(abort, 'disk full'); end")
    with one_torch_thread(), TestClient(create_app(model_dir, audit=trail), raise_server_exceptions=False) as client:
        r = client.post("/api/predict", files={"file": ("x.jpeg", jpeg_bytes(), "image/jpeg")}, params={"heatmap": "0"})
    assert r.status_code == 503 and "audit trail" in r.json()["detail"]
    assert "label" not in r.json()
