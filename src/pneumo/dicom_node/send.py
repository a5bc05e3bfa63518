"""Results to the PACS: one C-STORE association per film, or an error naming what failed.

The destination is ``AET@HOST:PORT``; every status other than success (or a warning that the
instance was stored, such as coercion of attributes) fails the delivery, and the film stays in the
spool to be tried again: a result is never dropped because the PACS was down for a while.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pneumo.errors import PneumoError
from pneumo.extras import require

DESTINATION = re.compile(r"^(?P<aet>[^@\\]{1,16})@(?P<host>[^:@\s]+|\[[0-9a-fA-F:]+\]):(?P<port>\d{1,5})$")
STORED = {0x0000, 0xB000, 0xB006, 0xB007}  # success, and the warnings that say the instance was stored


class DeliveryError(PneumoError):
    """The destination could not be reached or refused a result: try again later."""


@dataclass(frozen=True)
class Destination:
    """Where results go: an AE title at a host and port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def parse_destination(text: str) -> Destination:
    """``AET@HOST:PORT`` (``--send-to``), or a PneumoError that shows the form."""
    match = DESTINATION.match(text.strip())
    if not match or not 0 < int(match["port"]) < 65536:
        raise PneumoError(f"--send-to {text!r}: expected AET@HOST:PORT, e.g. ORTHANC@pacs.example.org:4242")
    return Destination(match["aet"].strip(), match["host"].strip("[]"), int(match["port"]))


def check_ae_title(title: str, option: str = "--ae-title") -> str:
    """An AE title as DICOM allows it: 1-16 characters, no backslash or control characters."""
    if not 1 <= len(title.strip()) <= 16 or "\\" in title or any(ord(c) < 32 for c in title):
        raise PneumoError(f"{option} {title!r}: an AE title has 1 to 16 characters, no backslash")
    return title.strip()


def store(datasets: Sequence[Any], destination: Destination, calling_ae: str, timeout: float = 30.0) -> None:
    """C-STORE ``datasets`` to ``destination`` on one association; DeliveryError on any failure."""
    pynetdicom = require("dicom-node", "pynetdicom", what="the DICOM node")
    ae = pynetdicom.AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    ae.connection_timeout = min(timeout, 10.0)
    for sop in dict.fromkeys(str(ds.SOPClassUID) for ds in datasets):
        ae.add_requested_context(sop, ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "could not be opened"
        raise DeliveryError(f"association with {destination} {why}")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = int(getattr(status, "Status", -1)) if status else -1
            if code not in STORED:
                reason = "no answer" if code < 0 else f"status 0x{code:04X}"
                raise DeliveryError(f"{destination} did not store a {ds.SOPClassUID.name} ({reason})")
    finally:
        if assoc.is_established:
            assoc.release()
