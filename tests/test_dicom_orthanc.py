"""pneumo's DICOM node against a real PACS: Orthanc (Debian ``orthanc`` + ``orthanc-dicomweb``) started on
loopback ports in a temporary folder, DCMTK's ``storescu`` sending the five shared films to
``pneumo dicom listen``, the results checked through Orthanc's REST API; and ``pneumo dicom poll``
over Orthanc's DICOMweb plugin. Skipped, with the reason, where Orthanc or DCMTK is not installed
(``tools/install_pacs.sh``, run by ``make install``).
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from conftest import free_port, one_torch_thread
from test_dicom_node import FILMS, NOT_CHESTS, needs_films, read_film, referenced_uid, sr_finding, start_node

pydicom = pytest.importorskip("pydicom")
pytest.importorskip("pynetdicom", reason="the dicom-node extra (pynetdicom) is not installed")

ORTHANC = shutil.which("Orthanc") or "/usr/sbin/Orthanc"
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
needs_orthanc = pytest.mark.skipif(
    not Path(ORTHANC).is_file(),
    reason="Orthanc is not installed (Debian: apt-get install orthanc; tools/install_pacs.sh)",
)
needs_storescu = pytest.mark.skipif(
    shutil.which("storescu") is None, reason="DCMTK's storescu is not installed (Debian: apt-get install dcmtk)"
)
needs_dicomweb = pytest.mark.skipif(
    not DICOMWEB_PLUGIN.is_file(), reason="Orthanc's DICOMweb plugin is not installed (Debian: orthanc-dicomweb)"
)
SR_CLASS, SC_CLASS = "1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.7"
# storescu (DCMTK 3.6.7) proposes a compressed transfer syntax only when told which: its -R does not
PROPOSE = {"1.2.840.10008.1.2.4.91": "-xw", "1.2.840.10008.1.2.4.90": "-xv", "1.2.840.10008.1.2.4.70": "-xs",
           "1.2.840.10008.1.2.4.50": "-xy"}  # fmt: skip


def storescu(port: int, films: list[Path]) -> list[subprocess.CompletedProcess]:
    """Each film sent by storescu as a modality would, proposing the film's own transfer syntax."""
    done = []
    for path in films:
        syntax = str(pydicom.dcmread(path, force=True, stop_before_pixels=True).file_meta.get("TransferSyntaxUID", ""))
        option = [PROPOSE[syntax]] if syntax in PROPOSE else []
        command = ["storescu", "-aet", "MODALITY1", "-aec", "PNEUMO", *option, "127.0.0.1", str(port), str(path)]
        done.append(subprocess.run(command, capture_output=True, text=True, timeout=120))
    return done


class Orthanc:
    """An Orthanc of its own: storage in ``folder``, HTTP and DICOM on free loopback ports."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC"):
        self.http_port, self.dicom_port, self.ae_title = free_port(), free_port(), ae_title
        folder.mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "pneumo-test",
            "StorageDirectory": str(folder / "db"),
            "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": True,
            "Plugins": [str(DICOMWEB_PLUGIN)] if DICOMWEB_PLUGIN.is_file() else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StableAge": 1,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = (folder / "orthanc.log").open("w")
        self.proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.http_port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, (folder / "orthanc.log").read_text()[-2000:]
            try:
                if httpx.get(f"{self.url}/system", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError("Orthanc did not start")

    def get(self, path: str):
        r = httpx.get(f"{self.url}{path}", timeout=30)
        r.raise_for_status()
        return r.json() if "json" in r.headers.get("content-type", "") else r.content

    def instances_of_study(self, study_uid: str) -> list:
        """Every instance Orthanc holds in the study, as pydicom data sets."""
        found = httpx.post(
            f"{self.url}/tools/lookup", content=study_uid, timeout=30
        ).json()  # the study's Orthanc id from its UID
        out = []
        for hit in found:
            if hit["Type"] != "Study":
                continue
            for instance in self.get(f"/studies/{hit['ID']}/instances"):
                out.append(pydicom.dcmread(io.BytesIO(self.get(f"/instances/{instance['ID']}/file")), force=True))
        return out

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture
def orthanc(tmp_path):
    server = Orthanc(tmp_path / "orthanc-home")
    yield server
    server.close()


@pytest.fixture(scope="module")
def node_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from test_audit_record import make_model_folder

    with one_torch_thread():
        return make_model_folder(tmp_path_factory.mktemp("dicom-orthanc-run"))


def wait_for_instances(orthanc: Orthanc, n: int, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(orthanc.get("/instances")) >= n:
            return
        time.sleep(0.3)
    raise AssertionError(f"Orthanc holds {len(orthanc.get('/instances'))} instances, expected {n}")


@needs_films
@needs_orthanc
@needs_storescu
def test_storescu_films_come_back_to_orthanc_as_sr_and_secondary_capture_in_their_studies(
    node_model, tmp_path, orthanc
):
    from pneumo.dicom_node.send import Destination

    node = start_node(node_model, tmp_path, Destination(orthanc.ae_title, "127.0.0.1", orthanc.dicom_port))
    try:
        with one_torch_thread():
            for sent in storescu(node.port, FILMS):
                assert sent.returncode == 0, sent.stderr[-2000:]
            wait_for_instances(orthanc, 10)  # two results per film (Orthanc holds only the results)
    finally:
        node.stop()
        node.reader.close()
    for path in FILMS:
        film = read_film(path)
        instances = orthanc.instances_of_study(str(film.StudyInstanceUID))
        by_class = {str(ds.SOPClassUID): ds for ds in instances if referenced_uid(ds) == str(film.SOPInstanceUID)}
        assert set(by_class) == {SR_CLASS, SC_CLASS}, path.name
        sr, sc = by_class[SR_CLASS], by_class[SC_CLASS]
        assert str(sr.PatientID) == str(film.get("PatientID", "")) and sr.StudyInstanceUID == film.StudyInstanceUID
        assert sc.Modality == "OT" and sr.Modality == "SR" and sr.SeriesInstanceUID != sc.SeriesInstanceUID
        expected = {"Not assessed"} if path.name in NOT_CHESTS else {"Suspected", "Not suspected"}
        assert sr_finding(sr) in expected, path.name


@needs_films
@needs_orthanc
@needs_dicomweb
def test_poll_reads_what_arrived_over_dicomweb_once_and_remembers_it(node_model, tmp_path, orthanc):
    from pneumo.dicom_node.poll import poll

    for path in FILMS[1:3] + [f for f in FILMS if f.name in NOT_CHESTS][:1]:
        httpx.post(f"{orthanc.url}/instances", content=path.read_bytes(), timeout=30).raise_for_status()
    state = tmp_path / "poll.json"
    url = f"{orthanc.url}/dicom-web"
    with one_torch_thread():
        first = poll(node_model, url, state=state, once=True, db=tmp_path / "audit.sqlite", gradcam=False)
        assert first.delivered == 3
        second = poll(node_model, url, state=state, once=True, db=tmp_path / "audit.sqlite", gradcam=False)
    assert second.delivered == 0  # the state file remembers what was read, across runs
    assert len(orthanc.get("/instances")) == 3 + 6
    studies = {str(read_film(p).StudyInstanceUID) for p in FILMS[1:3]}
    for study in studies:
        classes = {str(ds.SOPClassUID) for ds in orthanc.instances_of_study(study)}
        assert {SR_CLASS, SC_CLASS} <= classes
