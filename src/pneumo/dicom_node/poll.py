"""``pneumo dicom poll``: the DICOMweb alternative to the SCP, for archives that speak HTTP.

Each poll asks the archive (QIDO-RS) for its CR and DX instances, fetches those it has not read yet
(WADO-RS), reads each as ``listen`` does, and stores its SR and secondary capture (STOW-RS). What was
read is kept in a state file (default ``MODEL/dicomweb_poll.json``) written atomically after each
film, so a restart continues where the last run stopped; a film whose results were stored but not yet
written to the state is read again and stored under the same UIDs. The state holds keyed hashes of
the instance UIDs (a random key of its own, in the file), never the UIDs.

Limits: QIDO-RS has no "arrived after" filter, so each poll lists every CR and DX instance the
archive offers (StudyDate says when a film was taken, not when it arrived, so it cannot stand in);
an archive of millions of radiographs wants the SCP (``pneumo dicom listen``) instead.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging
import secrets
import signal
import threading
import time
from pathlib import Path
from typing import Any

from pneumo.dicom_node.node import Counts, Reader
from pneumo.dicom_node.reading import NOT_ASSESSED
from pneumo.errors import PneumoError
from pneumo.extras import require
from pneumo.io_utils import atomic_write_json
from pneumo.model_meta import model_folder

log = logging.getLogger("pneumo.dicom")
MODALITIES = ("CR", "DX")
UID_TAGS = {"study": "0020000D", "series": "0020000E", "instance": "00080018"}


class PollState:
    """What was read: keyed hashes of SOP Instance UIDs, in a JSON file written atomically."""

    def __init__(self, path: Path):
        self.path = path
        try:
            saved = json.loads(path.read_text()) if path.is_file() else {}
            self.key, self.seen = bytes.fromhex(saved.get("key", "")), set(saved.get("read", []))
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            raise PneumoError(f"{path}: not a poll state file ({exc}); move it away to start afresh") from None
        if not self.key:
            self.key = secrets.token_bytes(32)
        self.last_poll: str | None = saved.get("last_poll")

    def hashed(self, uid: str) -> str:
        return hmac.new(self.key, uid.encode(), hashlib.sha256).hexdigest()

    def __contains__(self, uid: str) -> bool:
        return self.hashed(uid) in self.seen

    def add(self, uid: str) -> None:
        self.seen.add(self.hashed(uid))
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, {"key": self.key.hex(), "read": sorted(self.seen), "last_poll": self.last_poll})


def _uid(found: dict, name: str) -> str:
    return str(found.get(UID_TAGS[name], {}).get("Value", [""])[0])


def poll_once(client: Any, reader: Reader, state: PollState, counts: Counts) -> None:
    """One poll: list CR and DX instances, read the new ones, store their results."""
    pydicom = require("dicom", "pydicom", what="the DICOM node")
    found = []
    for modality in MODALITIES:
        found += client.search_for_instances(search_filters={"Modality": modality}, get_remaining=True)
    for hit in found:
        study, series, instance = (_uid(hit, n) for n in ("study", "series", "instance"))
        if not instance or instance in state:
            continue
        arrived = time.time()
        ds = client.retrieve_instance(study, series, instance)
        buffer = io.BytesIO()
        pydicom.dcmwrite(buffer, ds, enforce_file_format=False)
        data = buffer.getvalue()
        source, reading, results = reader.read(data)
        client.store_instances(datasets=results.instances)
        latency = time.time() - arrived
        reader.record(data, source, reading, 1000 * latency, None, "dicomweb")
        state.add(instance)
        counts.delivered += 1
        counts.read += reading.probabilities is not None
        counts.not_assessed += reading.finding == NOT_ASSESSED
        counts.latencies_s.append(latency)
        log.info("%s: results stored over DICOMweb in %.2f s from fetch", reading.finding, latency)
    state.last_poll = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    state.save()


def poll(
    model: str | Path,
    url: str,
    state: str | Path | None = None,
    interval: float = 10.0,
    once: bool = False,
    runtime: str = "auto",
    db: str | Path | None = None,
    audit: bool = True,
    uid_root: str | None = None,
    gradcam: bool = True,
) -> Counts:
    """Poll ``url`` (a DICOMweb root) every ``interval`` seconds until SIGTERM or Ctrl-C (or once)."""
    api = require("dicom-node", "dicomweb_client.api", what="pneumo dicom poll")
    folder = model_folder(model)
    poll_state = PollState(Path(state) if state else folder / "dicomweb_poll.json")
    reader = Reader(folder, runtime=runtime, db=db, audit=audit, uid_root=uid_root, gradcam=gradcam)
    client = api.DICOMwebClient(url=url.rstrip("/"))
    counts, stopped = Counts(), threading.Event()
    previous = {}
    if not once and threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, lambda *_: stopped.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while not stopped.is_set():
            try:
                poll_once(client, reader, poll_state, counts)
            except PneumoError:
                raise
            except Exception as exc:  # noqa: BLE001 - the archive down or refusing: say so, try again
                if once:
                    raise PneumoError(
                        f"DICOMweb poll of {url} failed ({type(exc).__name__})"
                    ) from None  # its text may hold UIDs
                log.warning("DICOMweb poll failed (%s); next try in %.0f s", type(exc).__name__, interval)
            if once:
                break
            stopped.wait(interval)
    finally:
        reader.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    print(f"pneumo dicom poll: {counts.delivered} result(s) stored ({counts.not_assessed} not assessed)", flush=True)
    return counts
