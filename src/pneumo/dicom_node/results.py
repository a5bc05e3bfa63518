"""What goes back to the PACS for one film: a TID 1500 measurement report (SR) and a secondary capture.

Both are new series in the source's study; highdicom copies the patient, study and accession
attributes from the source so that the PACS files them together. UIDs are made under a configurable
root (pydicom's by default), derived from the source instance's UID and the model's identity: a film
read again after a restart (its results sent but the spool not yet cleared when the node was killed)
produces the same UIDs, so the PACS replaces rather than duplicates.

The SR follows the IHE AI Results (AIR) profile's form for AI results: TID 1500 Measurement Report,
one TID 1501 measurement group with TID 4019 algorithm identification, p(positive) and the
threshold as numeric measurements and the finding as a coded qualitative evaluation. Where pneumo
departs from AIR (said in the README too): the finding's "not suspected" and "not assessed" values,
and the two measurement names, are codes of pneumo's own scheme (``99PNEUMO``) because SNOMED CT and
DICOM have none that fit; the reason a film was not assessed, how the threshold was chosen and that
the result is not a diagnosis are TEXT items added to the measurement group (TID 1501 allows coded
evaluations only); the Grad-CAM map is a secondary capture rather than a parametric map or a
segmentation; and no Key Object Selection is sent.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pneumo.dicom_node.reading import MANUFACTURER, NOT_A_DIAGNOSIS, NOT_ASSESSED, SUSPECTED, FilmReading, ModelFacts
from pneumo.extras import require

SCHEME = "99PNEUMO"  # pneumo's own coding scheme (a "99" private scheme, as PS3.16 8.2 allows)
SR_SERIES_NUMBER, SC_SERIES_NUMBER = 9901, 9902  # high: a PACS lists them after the acquisition's series
SR_DESCRIPTION, SC_DESCRIPTION = "pneumo AI result (SR)", "pneumo AI result (Grad-CAM)"


@dataclass
class Results:
    """The instances sent for one film: the SR, and the secondary capture when the pixels were read."""

    sr: Any
    sc: Any | None

    @property
    def instances(self) -> list[Any]:
        return [self.sr] + ([self.sc] if self.sc is not None else [])


def node_modules() -> tuple[Any, Any]:
    """highdicom and pydicom, or a PneumoError naming the extra ``dicom-node``. pydicom is told not
    to check values as it reads and writes: its warnings quote the value (a UID, a name), and nothing
    from a patient's data set may reach a log."""
    hd = require("dicom-node", "pynetdicom", "highdicom", what="the DICOM node")
    pydicom = require("dicom", "pydicom", what="the DICOM node")
    settings = pydicom.config.settings
    settings.reading_validation_mode = settings.writing_validation_mode = pydicom.config.IGNORE
    logging.getLogger("pynetdicom.utils").setLevel(logging.ERROR)  # "Non-conformant ... UID value '...'"
    return hd, pydicom


def result_uid(root: str | None, source_uid: str, model_id: str, kind: str) -> str:
    """A UID under ``root`` (pydicom's when None), the same for the same film, model and kind."""
    _, pydicom = node_modules()
    prefix = root if root is None or root.endswith(".") else root + "."
    return pydicom.uid.generate_uid(
        prefix=prefix or pydicom.uid.PYDICOM_ROOT_UID, entropy_srcs=[source_uid, model_id, kind]
    )


def _codes(hd: Any) -> dict[str, Any]:
    concept = hd.sr.CodedConcept
    return {
        "finding": concept("233604007", "SCT", "Pneumonia"),
        SUSPECTED: concept("415684004", "SCT", "Suspected"),
        "not suspected": concept("not-suspected", SCHEME, "Not suspected"),
        NOT_ASSESSED: concept("not-assessed", SCHEME, "Not assessed"),
        "p": concept("p-positive", SCHEME, "Probability of the positive class"),
        "threshold": concept("threshold", SCHEME, "Decision threshold"),
        "unit": concept("1", "UCUM", "no units"),
        "procedure": concept("399208008", "SCT", "Plain chest X-ray"),
        "comment": concept("121106", "DCM", "Comment"),
        "device": concept("121007", "DCM", "Device"),
    }


def structured_report(source: Any, reading: FilmReading, facts: ModelFacts, uid_root: str | None = None) -> Any:
    """The TID 1500 measurement report of one reading, in a new series of ``source``'s study."""
    hd, _ = node_modules()
    code = _codes(hd)
    source = evidence(source)
    source_uid = str(source.SOPInstanceUID)
    uid = lambda kind: result_uid(uid_root, source_uid, facts.model_id, kind)  # noqa: E731
    parameters = [f"runtime {facts.runtime}", f"model sha256 {facts.model_id}"]
    if facts.threshold is not None:
        parameters.insert(0, f"threshold {facts.threshold:.6f} ({facts.threshold_words})")
    algorithm = hd.sr.AlgorithmIdentification(
        name=facts.name, version=facts.version, parameters=parameters, manufacturer=MANUFACTURER
    )
    measurements = []
    if reading.finding != NOT_ASSESSED and reading.p_positive is not None:
        measurements.append(
            hd.sr.Measurement(name=code["p"], value=reading.p_positive, unit=code["unit"], algorithm_id=algorithm)
        )
    if facts.threshold is not None:
        measurements.append(
            hd.sr.Measurement(name=code["threshold"], value=facts.threshold, unit=code["unit"], algorithm_id=algorithm)
        )
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid("tracking"), identifier="pneumo reading"),
        finding_type=code["finding"],
        algorithm_id=algorithm,
        measurements=measurements or None,
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(name=code["finding"], value=code[reading.finding])],
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
    )
    texts = [reading.words]
    if reading.reason:
        texts.append(f"Not assessed because: {reading.reason}")
    if facts.threshold is not None:
        texts.append(f"Threshold {facts.threshold:.4f} on p({facts.positive_class}); rule {facts.threshold_words}.")
    texts += [f"Model {facts.name}, {facts.version}.", NOT_A_DIAGNOSIS]
    for text in texts:
        group[0].ContentSequence.append(
            hd.sr.TextContentItem(
                name=code["comment"], value=text[:1024], relationship_type=hd.sr.RelationshipTypeValues.CONTAINS
            )
        )
    device = hd.sr.ObserverContext(
        observer_type=code["device"],
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=result_uid(uid_root, "device", facts.model_id, "observer"),
            name="pneumo",
            manufacturer_name=MANUFACTURER,
            model_name=facts.name,
        ),
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=device),
        procedure_reported=code["procedure"],
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=[source],
        content=report[0],
        series_instance_uid=uid("sr-series"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uid("sr"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        is_complete=True,
        series_description=SR_DESCRIPTION,
    )
    _copy_study(source, sr)
    return sr


def secondary_capture(source: Any, reading: FilmReading, facts: ModelFacts, uid_root: str | None = None) -> Any:
    """The overlay (banner and Grad-CAM map) as a secondary-capture image in a new series; None
    when the film's pixels could not be read."""
    if reading.overlay is None:
        return None
    hd, pydicom = node_modules()
    source = evidence(source)
    source_uid = str(source.SOPInstanceUID)
    uid = lambda kind: result_uid(uid_root, source_uid, facts.model_id, kind)  # noqa: E731
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=np.ascontiguousarray(np.asarray(reading.overlay.convert("RGB"), dtype=np.uint8)),
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=uid("sc-series"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=uid("sc"),
        instance_number=1,
        manufacturer=MANUFACTURER,
        patient_orientation=("L", "F"),
        transfer_syntax_uid="1.2.840.10008.1.2.1",  # explicit VR little endian: every PACS stores it
        series_description=SC_DESCRIPTION,
    )
    reference = pydicom.Dataset()
    reference.ReferencedSOPClassUID, reference.ReferencedSOPInstanceUID = source.SOPClassUID, source.SOPInstanceUID
    sc.SourceImageSequence = [reference]  # what it was derived from: the film it is about
    sc.DerivationDescription = "pneumo reading with a Grad-CAM overlay and the finding in a banner"
    sc.BurnedInAnnotation = "NO"  # the banner holds the finding, nothing that identifies the patient
    sc.ImageComments = reading.words[:10240]
    _copy_study(source, sc)
    return sc


TYPE2 = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "StudyID", "AccessionNumber", "StudyDate",
         "StudyTime", "ReferringPhysicianName")  # fmt: skip


def evidence(source: Any) -> Any:
    """The source's header without pixels, with the patient and study attributes a result must carry
    present (empty where the source left them out, as DICOM's type 2 allows)."""
    header = source.copy()
    for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if tag in header:
            del header[tag]
    for name in TYPE2:
        if name not in header:
            setattr(header, name, None)
    return header


COPIED = ("AccessionNumber", "StudyID", "StudyDate", "StudyTime", "ReferringPhysicianName", "IssuerOfPatientID")


def _copy_study(source: Any, result: Any) -> None:
    """The study attributes a PACS files by, where the source has them and highdicom left them out."""
    for name in COPIED:
        if name in source and (name not in result or not result.get(name)):
            setattr(result, name, source.get(name))


def build_results(source: Any, reading: FilmReading, facts: ModelFacts, uid_root: str | None = None) -> Results:
    """The SR and (when the film's pixels were read) the secondary capture for one reading."""
    return Results(
        structured_report(source, reading, facts, uid_root), secondary_capture(source, reading, facts, uid_root)
    )
