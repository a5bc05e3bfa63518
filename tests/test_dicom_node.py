"""``pneumo dicom listen`` against pynetdicom peers: the five shared films in, an SR and a secondary
capture per film out, to a second SCP that collects them; the queue's bound, malformed data sets,
garbage on the port, and a kill mid-stream (a subprocess, SIGKILL, restart) that loses no accepted film.
"""

from __future__ import annotations

import io
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import SHARED_DATA, free_port, one_torch_thread
from test_audit_record import make_model_folder

pydicom = pytest.importorskip("pydicom")
pynetdicom = pytest.importorskip("pynetdicom", reason="the dicom-node extra (pynetdicom) is not installed")
pytest.importorskip("highdicom", reason="the dicom-node extra (highdicom) is not installed")

from pydicom.filebase import DicomBytesIO  # noqa: E402
from pydicom.filewriter import write_dataset  # noqa: E402
from pynetdicom.dimse_primitives import C_STORE  # noqa: E402

from pneumo.audit.record import instance_key  # noqa: E402
from pneumo.dicom_node.node import DicomNode, Reader  # noqa: E402
from pneumo.dicom_node.send import Destination, parse_destination  # noqa: E402
from pneumo.dicom_node.spool import Spool  # noqa: E402
from pneumo.errors import PneumoError  # noqa: E402

SHARED_DICOM = SHARED_DATA / "dicom"
FILMS = sorted(SHARED_DICOM.glob("*.dcm"))
NOT_CHESTS = {"teeth_cr_mono1_modality_lut_jpeg_lossless.dcm", "tibia_cr_mono1_jpeg2000_lossless.dcm"}
SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"
SRC = str(Path(__file__).resolve().parents[1] / "src")
needs_films = pytest.mark.skipif(len(FILMS) < 5, reason=f"the five shared DICOM films are not at {SHARED_DICOM}")


def read_film(path: Path) -> pydicom.Dataset:
    """A shared film as a data set ready to send (the file without a meta header gets one)."""
    ds = pydicom.dcmread(path, force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    return ds


def send(port: int, datasets: list, ae_title: str = "PNEUMO", calling: str = "MODALITY1") -> list[int]:
    """C-STORE each data set on one association; the statuses (-1: no answer)."""
    ae = pynetdicom.AE(ae_title=calling)
    for ds in datasets:
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    assert assoc.is_established, "the node refused the association"
    statuses = []
    for ds in datasets:
        status = assoc.send_c_store(ds)
        statuses.append(int(status.Status) if status else -1)
    assoc.release()
    return statuses


class Collector:
    """A storage SCP standing in for the PACS: keeps every data set it is sent."""

    def __init__(self, ae_title: str = "PACS"):
        self.ae_title, self.received, self.lock = ae_title, [], threading.Lock()
        ae = pynetdicom.AE(ae_title=ae_title)
        ae.supported_contexts = pynetdicom.StoragePresentationContexts
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=[(pynetdicom.evt.EVT_C_STORE, self._store)]
        )

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        with self.lock:
            self.received.append(ds)
        return 0x0000

    @property
    def destination(self) -> Destination:
        return Destination(self.ae_title, "127.0.0.1", self.port)

    def wait_for(self, n: int, timeout: float = 120.0) -> list:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if len(self.received) >= n:
                    return list(self.received)
            time.sleep(0.1)
        raise AssertionError(f"the collector got {len(self.received)} instances, expected {n}")

    def close(self) -> None:
        self.server.shutdown()


def sr_texts(sr) -> list[str]:
    """Every TEXT value in an SR's content tree."""
    out = []

    def walk(items) -> None:
        for item in items:
            if item.ValueType == "TEXT":
                out.append(str(item.TextValue))
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return out


def sr_finding(sr) -> str:
    """The coded finding (the qualitative evaluation for Pneumonia) of a pneumo SR."""

    def walk(items):
        for item in items:
            if item.ValueType == "CODE" and item.ConceptNameCodeSequence[0].CodeValue == "233604007":
                return str(item.ConceptCodeSequence[0].CodeMeaning)
            found = walk(item.ContentSequence) if "ContentSequence" in item else None
            if found:
                return found
        return None

    return walk(sr.ContentSequence)


def referenced_uid(result) -> str:
    """The source instance an SR or secondary capture is about."""
    if result.SOPClassUID == SR_CLASS:
        return str(result.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0]
                   .ReferencedSOPSequence[0].ReferencedSOPInstanceUID)  # fmt: skip
    return str(result.SourceImageSequence[0].ReferencedSOPInstanceUID)


@pytest.fixture(scope="module")
def node_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    with one_torch_thread():
        return make_model_folder(tmp_path_factory.mktemp("dicom-node-run"))


@pytest.fixture
def collector():
    c = Collector()
    yield c
    c.close()


def start_node(model: Path, tmp_path: Path, destination: Destination, queue: int = 64, db: Path | None = None):
    reader = Reader(model, db=db or tmp_path / "audit.sqlite", uid_root="1.2.826.0.1.3680043.10.999.")
    node = DicomNode(reader, Spool(tmp_path / "spool", queue), destination, port=free_port(), timeout=10)
    node.start()
    return node


@needs_films
def test_five_films_get_an_sr_and_a_secondary_capture_each_in_their_own_study(node_model, tmp_path, collector):
    films = {f.name: read_film(f) for f in FILMS}
    node = start_node(node_model, tmp_path, collector.destination)
    try:
        with one_torch_thread():
            assert send(node.port, list(films.values())) == [0] * 5
            received = collector.wait_for(10)
    finally:
        node.stop()
        node.reader.close()
    by_source = {}
    for ds in received:
        by_source.setdefault(referenced_uid(ds), {})[str(ds.SOPClassUID)] = ds
    for name, film in films.items():
        results = by_source[str(film.SOPInstanceUID)]
        sr, sc = results[SR_CLASS], results[SC_CLASS]
        for result in (sr, sc):  # filed with the source: same patient, study and accession
            for attr in ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate"):
                assert str(result.get(attr, "")) == str(film.get(attr, "")), (name, attr)
            assert result.SeriesInstanceUID != film.SeriesInstanceUID and result.SOPInstanceUID != film.SOPInstanceUID
            assert str(result.SOPInstanceUID).startswith("1.2.826.0.1.3680043.10.999.")
            pydicom.uid.UID(str(result.SOPInstanceUID)).is_valid  # noqa: B018
        assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
        assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
        texts = " ".join(sr_texts(sr))
        assert "not a diagnosis" in texts and "sha256" in texts and "validation films" in texts
        banner = str(sc.ImageComments)
        assert sc.Rows > 100 and sc.SamplesPerPixel == 3 and "not a diagnosis" in banner
        if name in NOT_CHESTS:
            assert sr_finding(sr) == "Not assessed" and "NOT ASSESSED" in banner
            assert "not the chest" in texts
        else:
            assert sr_finding(sr) in ("Suspected", "Not suspected") and "p(PNEUMONIA)" in banner
    # the audit trail: three readings (the two other films were never read), keyed by a keyed hash
    # of the SOP Instance UID, with the calling AE title; no UID anywhere in the database
    with sqlite3.connect(tmp_path / "audit.sqlite") as db:
        rows = db.execute("SELECT instance_key, calling_ae, source FROM readings").fetchall()
        dump = "\n".join(db.iterdump())
    key = bytes.fromhex((tmp_path / "audit.key").read_text().strip())
    chests = {instance_key(key, str(f.SOPInstanceUID)) for n, f in films.items() if n not in NOT_CHESTS}
    assert {r[0] for r in rows} == chests and {r[1:] for r in rows} == {("MODALITY1", "dicom")}
    for film in films.values():
        assert str(film.SOPInstanceUID) not in dump and str(film.StudyInstanceUID) not in dump


def synthetic_film(rows: int = 64, study: str | None = None) -> pydicom.Dataset:
    """A small uncompressed CR chest film with fresh UIDs."""
    from pydicom.dataset import FileMetaDataset

    uid = pydicom.uid.generate_uid
    ds = pydicom.Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1"
    ds.SOPInstanceUID, ds.StudyInstanceUID, ds.SeriesInstanceUID = uid(), study or uid(), uid()
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    ds.Modality, ds.BodyPartExamined, ds.ViewPosition = "CR", "CHEST", "PA"
    ds.PatientID, ds.PatientName, ds.AccessionNumber = "TEST-1", "Test^Patient", "ACC1"
    ds.Rows = ds.Columns = rows
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.random.default_rng(0).integers(0, 255, (rows, rows), dtype=np.uint8).tobytes()
    return ds


def encoded(ds: pydicom.Dataset) -> bytes:
    """A data set's bytes in explicit VR little endian, as a C-STORE carries them."""
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def send_raw(assoc, payload: bytes, sop_class: str = "1.2.840.10008.5.1.4.1.1.1") -> int:
    """A C-STORE whose data set is ``payload`` as given (pynetdicom's send_c_store would check it first)."""
    request = C_STORE()
    request.MessageID, request.Priority = 7, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = sop_class, pydicom.uid.generate_uid()
    request.DataSet = io.BytesIO(payload)
    context = assoc._get_valid_context(sop_class, pydicom.uid.ExplicitVRLittleEndian, "scu")
    assoc._reactor_checkpoint.clear()  # as send_c_store does: the reactor paused, the answer is ours
    while not assoc._is_paused:
        time.sleep(0.001)
    try:
        assoc.dimse.send_msg(request, context.context_id)
        _, response = assoc.dimse.get_msg(block=True)
    finally:
        assoc._reactor_checkpoint.set()
    return int(response.Status) if response is not None else -1


def test_a_full_queue_answers_out_of_resources_at_once_and_keeps_what_it_accepted(node_model, tmp_path):
    unreachable = Destination("NOBODY", "127.0.0.1", free_port())  # results cannot leave: the queue fills
    node = start_node(node_model, tmp_path, unreachable, queue=2)
    try:
        start = time.monotonic()
        statuses = send(node.port, [synthetic_film() for _ in range(4)])
        assert time.monotonic() - start < 10
    finally:
        node.stop()
        node.reader.close()
    assert statuses[:2] == [0, 0] and statuses[2:] == [0xA700, 0xA700]
    assert len(list((tmp_path / "spool" / "queue").glob("*.dcm"))) == 2  # accepted, undelivered, kept


def test_malformed_data_sets_and_garbage_get_failure_statuses_and_the_node_keeps_answering(
    node_model, tmp_path, collector, caplog
):
    node = start_node(node_model, tmp_path, collector.destination)
    try:
        no_pixels = synthetic_film()
        del no_pixels.PixelData
        no_uid = synthetic_film()
        no_uid.StudyInstanceUID = ""
        ae = pynetdicom.AE(ae_title="MODALITY1")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1", pydicom.uid.ExplicitVRLittleEndian)
        assoc = ae.associate("127.0.0.1", node.port, ae_title="PNEUMO")
        statuses = [int(assoc.send_c_store(ds).Status) for ds in (no_pixels, no_uid)]
        # bytes pynetdicom would not encode: a sequence whose items are garbage, a DX data set in a CR context
        garbage = (
            encoded(synthetic_film()) + b"\x08\x00\x40\x11SQ\x00\x00\x10\x00\x00\x00\xfe\xff\x00\xe0" + b"\xff" * 12
        )
        dx = synthetic_film()
        dx.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        statuses += [send_raw(assoc, garbage), send_raw(assoc, encoded(dx))]
        assoc.release()
        assert [s >> 12 for s in statuses[:3]] == [0xC, 0xC, 0xC] and statuses[3] == 0xA900
        # bytes that are not DICOM, then a truncated association request: dropped, no traceback
        for junk in (b"GET / HTTP/1.1\r\n\r\n" + os.urandom(512), bytes.fromhex("0100000000cc0001")):
            with socket.create_connection(("127.0.0.1", node.port), timeout=5) as s:
                s.sendall(junk)
                s.settimeout(5)
                try:
                    s.recv(1024)
                except (TimeoutError, ConnectionResetError):
                    pass
        # an association for another AE title is rejected; C-ECHO and a good film still work
        other = pynetdicom.AE(ae_title="MODALITY1")
        other.add_requested_context("1.2.840.10008.1.1")
        assert other.associate("127.0.0.1", node.port, ae_title="SOMEONE").is_rejected
        echo = other.associate("127.0.0.1", node.port, ae_title="PNEUMO")
        assert int(echo.send_c_echo().Status) == 0
        echo.release()
        with one_torch_thread():
            assert send(node.port, [synthetic_film()]) == [0]
            collector.wait_for(2)
    finally:
        node.stop()
        node.reader.close()
    assert "Traceback" not in caplog.text
    assert "Test^Patient" not in caplog.text and "TEST-1" not in caplog.text


def test_destination_parsing():
    assert parse_destination("ORTHANC@pacs.example.org:4242") == Destination("ORTHANC", "pacs.example.org", 4242)
    for bad in ("ORTHANC@host", "host:4242", "A@h:70000", "WAY_TOO_LONG_AE_TITLE@h:1"):
        with pytest.raises(PneumoError, match="AET@HOST:PORT"):
            parse_destination(bad)


def listener(model: Path, tmp_path: Path, port: int, destination: Destination) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, *sys.path]), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pneumo", "dicom", "listen", str(model), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--send-to", f"{destination.ae_title}@127.0.0.1:{destination.port}"]
    command += ["--spool", str(tmp_path / "spool"), "--db", str(tmp_path / "audit.sqlite"), "--no-gradcam"]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_listening(proc: subprocess.Popen, port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stdout.read()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.2)
    raise AssertionError("the listener did not start")


@pytest.mark.timeout(300)
def test_a_killed_listener_loses_no_accepted_film(node_model, tmp_path, collector):
    port = free_port()
    proc = listener(node_model, tmp_path, port, collector.destination)
    wait_listening(proc, port)
    accepted, study = [], pydicom.uid.generate_uid()
    stop = threading.Event()

    def stream() -> None:  # one film per association, as a modality sends, until the node dies
        while not stop.is_set():
            film = synthetic_film(study=study)
            try:
                if send(port, [film]) == [0]:
                    accepted.append(str(film.SOPInstanceUID))
            except AssertionError:
                return

    sender = threading.Thread(target=stream)
    sender.start()
    deadline = time.monotonic() + 60
    while len(accepted) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    stop.set()
    sender.join()
    assert len(accepted) >= 6
    left = len(list((tmp_path / "spool" / "queue").glob("*.dcm")))
    proc = listener(node_model, tmp_path, port, collector.destination)  # the restart works off the queue
    try:
        wait_listening(proc, port)
        received = collector.wait_for(2 * len(accepted), timeout=180)
        deadline = time.monotonic() + 30
        while list((tmp_path / "spool" / "queue").glob("*.dcm")) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGTERM)
        out = proc.communicate(timeout=60)[0]
    srs = {referenced_uid(ds) for ds in received if ds.SOPClassUID == SR_CLASS}
    assert set(accepted) <= srs, f"{len(set(accepted) - srs)} accepted films have no result ({left} were queued)"
    assert "Traceback" not in out and proc.returncode == 0, out
