"""``pneumo dicom listen``: the SCP, the spool and the workers that read films and send results back.

A film's path through the node: the SCP spools it (``scp``, ``spool``) and answers; a worker takes it
in arrival order, reads it (``reading``), builds the SR and the secondary capture (``results``),
stores them at the destination (``send``), records the reading in the audit trail, and only then
removes it from the spool. A kill at any point loses nothing: an instance acknowledged is on disk,
and an instance whose results were sent but not yet cleared is read and sent again after the
restart, under the same UIDs (the PACS replaces, not duplicates). A film the worker cannot handle at
all (a bug, not bad input: bad input gets a "not assessed" result) is moved to ``failed/`` and said
so, never retried forever. Results the PACS did not take are retried with a growing pause.
"""

from __future__ import annotations

import io
import logging
import signal
import threading
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pneumo.audit.record import AuditTrail
from pneumo.dicom_node.reading import NOT_ASSESSED, FilmReading, ModelFacts, read_film
from pneumo.dicom_node.results import Results, build_results, node_modules
from pneumo.dicom_node.scp import make_ae, start_scp
from pneumo.dicom_node.send import DeliveryError, Destination, store
from pneumo.dicom_node.spool import Spool, arrival_seconds
from pneumo.errors import PneumoError
from pneumo.infer.runtime import open_chosen
from pneumo.infer.scope import ScopeCheck
from pneumo.model_meta import model_folder

log = logging.getLogger("pneumo.dicom")
FAILED = "failed"
MAX_RETRY_PAUSE = 60.0


class Reader:
    """One model, its scope check and its audit trail: a film's bytes in, its results and record out."""

    def __init__(
        self,
        model: str | Path,
        runtime: str = "auto",
        db: str | Path | None = None,
        audit: bool = True,
        uid_root: str | None = None,
        gradcam: bool = True,
    ):
        node_modules()  # the extra, named before the model loads
        self.folder = model_folder(model)
        # auto keeps PyTorch when the Grad-CAM capture is asked for: onnxruntime has no gradients
        needs = "the Grad-CAM secondary capture" if gradcam and runtime == "auto" else None
        self.model, chosen, self.runtime_reason = open_chosen(self.folder, runtime, needs_network=needs)
        self.trail = AuditTrail.open(db, self.folder, runtime=chosen) if audit else None
        self.scope = ScopeCheck(self.model)
        self.facts = ModelFacts.of(self.model, self.folder, chosen)
        self.uid_root, self.gradcam = uid_root, gradcam

    def read(self, data: bytes) -> tuple[Any, FilmReading, Results]:
        """The source's header, the reading and the results of one Part 10 file."""
        _, pydicom = node_modules()
        source = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
        reading = read_film(self.model, self.scope, self.facts, data, gradcam=self.gradcam)
        with warnings.catch_warnings():  # highdicom's remarks on the source's names would echo them
            warnings.simplefilter("ignore")
            results = build_results(source, reading, self.facts, self.uid_root)
        return source, reading, results

    def record(
        self, data: bytes, source: Any, reading: FilmReading, latency_ms: float, calling_ae: str | None, kind: str
    ) -> str | None:
        """The reading in the audit trail (films the network never saw have no reading to record)."""
        if self.trail is None or reading.probabilities is None:
            return None
        return self.trail.record_reading(
            data,
            reading.probabilities,
            latency_ms,
            source=kind,
            size=reading.size,
            in_scope=reading.in_scope,
            instance=str(source.SOPInstanceUID),
            calling_ae=calling_ae,
        )

    def close(self) -> None:
        if self.trail is not None:
            self.trail.close()


@dataclass
class Counts:
    """What the node did since it started (printed when it stops; ``bench/dicom_node.py`` reads it)."""

    read: int = 0
    not_assessed: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    latencies_s: list[float] = field(default_factory=list)


class DicomNode:
    """The listener and its workers; ``start`` returns at once, ``stop`` waits for the workers."""

    def __init__(
        self,
        reader: Reader,
        spool: Spool,
        destination: Destination,
        ae_title: str = "PNEUMO",
        host: str = "127.0.0.1",
        port: int = 11112,
        workers: int = 1,
        timeout: float = 30.0,
    ):
        self.reader, self.spool, self.destination = reader, spool, destination
        self.ae_title, self.host, self.port, self.timeout = ae_title, host, port, timeout
        self.workers = workers
        self.counts = Counts()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server: Any = None
        self._lock = threading.Lock()

    def start(self) -> None:
        self._server = start_scp(make_ae(self.ae_title, self.timeout), self.host, self.port, self.spool)
        self.port = self._server.server_address[1]
        for i in range(self.workers):
            thread = threading.Thread(target=self._work, name=f"pneumo-dicom-worker-{i}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def stop(self) -> None:
        """Stop listening, let each worker finish the film in hand; what is left stays spooled."""
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
        for thread in self._threads:
            thread.join()

    def _work(self) -> None:
        pause = 1.0
        while not self._stop.is_set():
            path = self.spool.take(timeout=0.2)
            if path is None:
                continue
            try:
                self.process(path)
                pause = 1.0
            except DeliveryError as exc:
                with self._lock:
                    self.counts.retried += 1
                log.warning("results not delivered (%s): the film stays queued, next try in %.0f s", exc, pause)
                self._stop.wait(pause)
                pause = min(2 * pause, MAX_RETRY_PAUSE)
                self.spool.requeue(path)
            except Exception as exc:  # noqa: BLE001 - one film must not stop the node; kept for a person to look at
                self._quarantine(path, exc)

    def process(self, path: Path) -> None:
        """Read one spooled film, deliver its results, record it, then clear it from the spool."""
        data = path.read_bytes()
        source, reading, results = self.reader.read(data)
        calling = str(source.file_meta.get("SourceApplicationEntityTitle", "") or "").strip() or None
        store(results.instances, self.destination, self.ae_title, self.timeout)
        latency = time.time() - arrival_seconds(path)
        self.reader.record(data, source, reading, 1000 * latency, calling, "dicom")
        self.spool.done(path)
        with self._lock:
            self.counts.read += reading.probabilities is not None
            self.counts.not_assessed += reading.finding == NOT_ASSESSED
            self.counts.delivered += 1
            self.counts.latencies_s.append(latency)
        log.info("%s: results stored at %s in %.2f s from arrival", reading.finding, self.destination, latency)

    def _quarantine(self, path: Path, exc: Exception) -> None:
        failed = self.spool.folder / FAILED
        failed.mkdir(mode=0o700, exist_ok=True)
        try:
            path.replace(failed / path.name)
        finally:
            self.spool.done(path)
        with self._lock:
            self.counts.failed += 1
        where = traceback.extract_tb(exc.__traceback__)[-1] if exc.__traceback__ else None
        at = f" at {Path(where.filename).name}:{where.lineno}" if where else ""  # the place, never the values
        log.error("could not read a film (%s%s); it was moved to %s", type(exc).__name__, at, failed)


def listen(
    model: str | Path,
    send_to: Destination,
    ae_title: str = "PNEUMO",
    host: str = "0.0.0.0",
    port: int = 11112,
    spool_dir: str | Path | None = None,
    queue_limit: int = 64,
    runtime: str = "auto",
    db: str | Path | None = None,
    audit: bool = True,
    uid_root: str | None = None,
    workers: int = 1,
    gradcam: bool = True,
) -> Counts:
    """Run the node until SIGTERM or Ctrl-C; the spool (default ``MODEL/dicom_spool``) survives it."""
    folder = model_folder(model)
    spool = Spool(spool_dir or folder / "dicom_spool", queue_limit)
    waiting = len(spool)
    reader = Reader(folder, runtime=runtime, db=db, audit=audit, uid_root=uid_root, gradcam=gradcam)
    node = DicomNode(reader, spool, send_to, ae_title=ae_title, host=host, port=port, workers=workers)
    stopped = threading.Event()
    previous = {s: signal.signal(s, lambda *_: stopped.set()) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        try:
            node.start()
        except OSError as exc:
            raise PneumoError(f"cannot listen on {host}:{port} ({exc.strerror or exc})") from None
        print(
            f"pneumo dicom: {ae_title} listening on {host}:{node.port}, results to {send_to}; "
            f"{waiting} film(s) waiting in {spool.folder}; runtime {reader.facts.runtime} ({reader.runtime_reason})",
            flush=True,
        )
        stopped.wait()
    finally:
        node.stop()
        reader.close()
        for s, handler in previous.items():
            signal.signal(s, handler)
    c = node.counts
    print(
        f"pneumo dicom: stopped; {c.delivered} result(s) delivered ({c.not_assessed} not assessed), "
        f"{len(spool)} film(s) left in the spool, {c.failed} failed",
        flush=True,
    )
    return c
