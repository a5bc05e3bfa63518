"""The storage SCP: accepts CR and DX images and C-ECHO, spools each instance, answers at once.

pneumo's own results (Manufacturer "pneumo"), should a PACS route them back, are answered with
success and dropped: reading them would send results about results, for ever.

Every C-STORE is answered from the handler's thread after the instance is on disk (``spool.Spool``)
and never waits on the model. What is refused, and with which status (PS3.4 Annex B.2.3):

- 0xA700 Out of Resources: the spool is full (the worker is behind) or the disk refused the write;
- 0xA900 Data Set does not match SOP Class: the data set says another SOP class than its context;
- 0xC000 Cannot understand: a data set that cannot be decoded, or without the SOP Instance UID, the
  study and series UIDs or pixel data that a reading and its results need.

Other SOP classes (CT, MR, reports ...) are not offered in association negotiation, so a sender gets
"abstract syntax not supported" for them; an association not addressed to the node's AE title is
rejected. No handler lets an exception out: a malformed data set is a failure status, never a
traceback. Nothing from the data set is logged; the calling AE title is.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pneumo.dicom_node.reading import MANUFACTURER
from pneumo.dicom_node.spool import Spool
from pneumo.extras import require

log = logging.getLogger("pneumo.dicom")

STORAGE_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.1": "CR",  # Computed Radiography Image Storage
    "1.2.840.10008.5.1.4.1.1.1.1": "DX",  # Digital X-Ray Image Storage - For Presentation
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX",  # Digital X-Ray Image Storage - For Processing
    # Secondary Capture: film digitisers and some exports (the SIIM chest films) send CR films so; the
    # scope check reads their Modality and refuses other secondary captures
    "1.2.840.10008.5.1.4.1.1.7": "SC",
}
VERIFICATION = "1.2.840.10008.1.1"
OUT_OF_RESOURCES, DOES_NOT_MATCH, CANNOT_UNDERSTAND, SUCCESS = 0xA700, 0xA900, 0xC000, 0x0000
REQUIRED = ("SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "Rows", "Columns")


def _status(code: int, comment: str = "") -> Any:
    pydicom = require("dicom", "pydicom", what="the DICOM node")
    ds = pydicom.Dataset()
    ds.Status = code
    if comment:
        ds.ErrorComment = comment[:64]
    return ds


def dataset_problem(ds: Any, context_class: str, affected_uid: str | None) -> tuple[int, str] | None:
    """Why a received data set cannot be read (status, comment), or None. Decodes every top-level
    element but the pixel data, so that a malformed one fails here and not in the worker."""
    for elem in ds:  # iterating converts each raw element: a malformed value raises here
        _ = elem.value if elem.tag != 0x7FE00010 else None
    if str(ds.get("SOPClassUID", "")) != context_class:
        return DOES_NOT_MATCH, "SOP Class UID does not match the presentation context"
    missing = [name for name in REQUIRED if not ds.get(name)]
    if missing:
        return CANNOT_UNDERSTAND, f"missing {', '.join(missing)}"
    if affected_uid and str(ds.SOPInstanceUID) != str(affected_uid):
        return CANNOT_UNDERSTAND, "SOP Instance UID differs from the request's"
    if "PixelData" not in ds:
        return CANNOT_UNDERSTAND, "no pixel data"
    return None


def store_handler(spool: Spool, on_stored: Callable[[], None] | None = None) -> Callable[[Any], Any]:
    """The EVT_C_STORE handler: check, spool durably, then answer."""
    dsutils = require("dicom-node", "pynetdicom.dsutils", what="the DICOM node")

    def handle(event: Any) -> Any:
        calling = str(event.assoc.requestor.ae_title).strip()
        try:
            ds = event.dataset
            problem = dataset_problem(ds, str(event.context.abstract_syntax), event.request.AffectedSOPInstanceUID)
        except Exception as exc:  # noqa: BLE001 - a data set that cannot be decoded is the sender's fault
            log.warning("refused an instance from %s: cannot decode its data set (%s)", calling, type(exc).__name__)
            return _status(CANNOT_UNDERSTAND, "the data set cannot be decoded")
        if problem is not None:
            log.warning("refused an instance from %s: %s", calling, problem[1])
            return _status(*problem)
        if str(ds.get("Manufacturer", "")).strip() == MANUFACTURER:
            log.info("ignored an instance from %s: one of pneumo's own results", calling)
            return _status(SUCCESS)
        try:
            meta = event.file_meta
            meta.SourceApplicationEntityTitle = calling
            data = b"".join((b"\0" * 128, b"DICM", dsutils.encode_file_meta(meta), event.request.DataSet.getvalue()))
            path = spool.put(data)
        except Exception as exc:  # noqa: BLE001 - a full disk or a read-only spool: say so, never crash
            log.error("could not spool an instance from %s: %s", calling, type(exc).__name__)
            return _status(OUT_OF_RESOURCES + 1, "cannot write the instance to the spool")
        if path is None:
            log.warning("queue full (%d instances): refused an instance from %s", spool.limit, calling)
            return _status(OUT_OF_RESOURCES, "queue full: send again later")
        if on_stored is not None:
            on_stored()
        return _status(SUCCESS)

    return handle


class NoTraceback(logging.Filter):
    """pynetdicom logs a peer's garbage with the traceback of its own parser: keep the line, drop the
    traceback (a bad peer is not a bug of the node, and the log stays readable)."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def quiet_pynetdicom() -> None:
    """Tracebacks off for every pynetdicom logger (a logger's filters are not inherited by its children)."""
    names = [n for n in logging.root.manager.loggerDict if n == "pynetdicom" or n.startswith("pynetdicom.")]
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, NoTraceback) for f in logger.filters):
            logger.addFilter(NoTraceback())


def make_ae(ae_title: str, network_timeout: float = 30.0, max_associations: int = 16) -> Any:
    """The application entity: CR and DX storage in every transfer syntax pynetdicom knows, and
    verification; associations must name ``ae_title``; idle or silent peers are dropped after
    ``network_timeout`` seconds."""
    pynetdicom = require("dicom-node", "pynetdicom", what="the DICOM node")
    ae = pynetdicom.AE(ae_title=ae_title)
    for sop in STORAGE_CLASSES:
        ae.add_supported_context(sop, pynetdicom.ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(VERIFICATION)
    ae.require_called_aet = True
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = network_timeout
    ae.maximum_associations = max_associations
    ae.maximum_pdu_size = 0  # no limit: the sender's PDUs as they come
    quiet_pynetdicom()
    return ae


def start_scp(ae: Any, host: str, port: int, spool: Spool, on_stored: Callable[[], None] | None = None) -> Any:
    """Listen on ``host:port`` in background threads; returns pynetdicom's server (``.shutdown()``)."""
    pynetdicom = require("dicom-node", "pynetdicom", what="the DICOM node")
    events = pynetdicom.evt
    handlers = [
        (events.EVT_C_STORE, store_handler(spool, on_stored)),
        (events.EVT_C_ECHO, lambda event: SUCCESS),
    ]
    return ae.start_server((host, port), block=False, evt_handlers=handlers)
