"""Small synthetic DICOM films written with pydicom, so DICOM behaviour is tested without shared data.

``chest_phantom`` is a crude frontal chest: two dark lung fields either side of a bright
mediastinum, as attenuation (high = bright in MONOCHROME2). ``write_dicom`` stores it with the
photometric interpretation, bit depth, rescale and window asked for, and identifying tags whose
values the privacy tests look for.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

PATIENT_NAME = "Doe^Janet"
STUDY_DATE = "20240229"
BIRTH_DATE = "19700101"


def chest_phantom(size: int = 48, bits: int = 12, seed: int = 0) -> np.ndarray:
    """Attenuation in [0, 2**bits - 1]: lungs low (dark), mediastinum and borders high (bright)."""
    top = (1 << bits) - 1
    y, x = np.mgrid[0:size, 0:size] / (size - 1)
    img = np.full((size, size), 0.75)
    lungs = ((np.abs(x - 0.5) - 0.3) ** 2 / 0.02 + (y - 0.5) ** 2 / 0.12) < 1
    img[lungs] = 0.2
    img += np.random.default_rng(seed).normal(0, 0.02, img.shape)
    return np.clip(img * top, 0, top).astype(np.uint16)


def write_dicom(
    path: str | Path,
    attenuation: np.ndarray | None = None,
    *,
    photometric: str = "MONOCHROME2",
    bits: int = 12,
    slope: float | None = None,
    intercept: float | None = None,
    window: tuple[float, float] | None = None,
    patient_id: str | None = "PAT-0001",
    body_part: str | None = "CHEST",
    view: str | None = "PA",
    modality: str = "DX",
    description: str | None = None,
    file_meta: bool = True,
) -> Path:
    """A single-frame grey DICOM of ``attenuation`` (stored inverted for MONOCHROME1)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    att = chest_phantom(bits=bits) if attenuation is None else attenuation
    stored = ((1 << bits) - 1 - att.astype(np.int64)).astype(np.uint16) if photometric == "MONOCHROME1" else att
    ds = Dataset()
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    ds.SOPInstanceUID = generate_uid()
    ds.Modality = modality
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.PatientName = PATIENT_NAME
    ds.PatientBirthDate = BIRTH_DATE
    ds.StudyDate = STUDY_DATE
    if body_part:
        ds.BodyPartExamined = body_part
    if view:
        ds.ViewPosition = view
    if description:
        ds.StudyDescription = description
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits, bits - 1, 0
    if slope is not None or intercept is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope or 1, intercept or 0
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype("<u2").tobytes()
    if file_meta:
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        ds.save_as(path, enforce_file_format=True)
    else:  # an old-style file: no preamble, no meta header, implicit VR little endian
        ds.save_as(path, implicit_vr=True, little_endian=True, enforce_file_format=False)
    return path
