"""DICOM in: rendered as DICOM says, read wherever an image goes in, patients from PatientID (hashed)."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pydicom", reason="the 'dicom' extra is not installed")

from conftest import SHARED_DATA, one_torch_thread  # noqa: E402
from dicom_synth import BIRTH_DATE, PATIENT_NAME, STUDY_DATE, chest_phantom, write_dicom  # noqa: E402
from pneumo.data.check import check_dataset  # noqa: E402
from pneumo.data.folders import discover, is_image_file, make_split  # noqa: E402
from pneumo.data.imaging import open_image, prepare  # noqa: E402
from pneumo.errors import ImageError, PneumoError  # noqa: E402

SHARED_DICOM = SHARED_DATA / "dicom"
CHEST_FILES = [
    "chest_cr_mono2_jpeg_baseline.dcm",
    "chest_cr_mono1_10bit_no_meta.dcm",
    "chest_cr_mono1_15bit_jpeg2000.dcm",
]
OTHER_FILES = ["teeth_cr_mono1_modality_lut_jpeg_lossless.dcm", "tibia_cr_mono1_jpeg2000_lossless.dcm"]


def lateral_and_central(grey: np.ndarray) -> tuple[float, float]:
    """Mean of the outer thirds and of the central third, over the middle third of the rows."""
    h, w = grey.shape
    mid = grey[h // 3 : 2 * h // 3].astype(np.float64)
    lateral = np.concatenate([mid[:, : w // 3].ravel(), mid[:, 2 * w // 3 :].ravel()]).mean()
    return float(lateral), float(mid[:, w // 3 : 2 * w // 3].mean())


# ---------------------------------------------------------------------------------------------
# rendering, on synthetic films (run everywhere)
# ---------------------------------------------------------------------------------------------
def test_monochrome1_is_inverted_so_both_interpretations_render_alike(tmp_path):
    mono2 = np.asarray(open_image(write_dicom(tmp_path / "a.dcm", photometric="MONOCHROME2")))
    mono1 = np.asarray(open_image(write_dicom(tmp_path / "b.dcm", photometric="MONOCHROME1")))
    np.testing.assert_array_equal(mono1, mono2)
    lateral, central = lateral_and_central(mono2)
    assert lateral < central - 40  # lungs dark, mediastinum bright


def test_stored_bit_depth_sets_the_scale_not_16_bits(tmp_path):
    att = np.array([[0, 1024, 2048, 4095]], dtype=np.uint16).repeat(4, axis=0)
    grey = np.asarray(open_image(write_dicom(tmp_path / "a.dcm", att, bits=12)))
    np.testing.assert_array_equal(grey[0], [0, 64, 128, 255])  # /4095, not /65535 (which gives 0 0 8 16)


def test_rescale_then_window(tmp_path):
    # stored v -> HU-like 2v - 1000; window 1000 +- 500 maps 500 -> 0, 1000 -> ~128, 1500 -> 255
    att = np.array([[0, 750, 1000, 1250, 1500, 4095]], dtype=np.uint16).repeat(4, axis=0)
    grey = np.asarray(open_image(write_dicom(tmp_path / "a.dcm", att, slope=2, intercept=-1000, window=(1000, 1000))))
    row = grey[0].astype(int)
    assert row[0] == 0 and row[1] == 0 and row[-1] == 255 and row[-2] == 255  # outside the window: clipped
    assert abs(row[2] - 128) <= 1  # the window's centre is mid-grey


def test_window_on_monochrome1_clips_then_inverts(tmp_path):
    att = np.array([[0, 2048, 4095]], dtype=np.uint16).repeat(4, axis=0)
    # MONOCHROME1 stores 4095 - att; window on the stored values; inverted afterwards
    grey = np.asarray(open_image(write_dicom(tmp_path / "a.dcm", att, photometric="MONOCHROME1", window=(2048, 2048))))
    assert grey[0, 0] == 0 and grey[0, 2] == 255 and abs(int(grey[0, 1]) - 128) <= 1


def test_files_without_extension_or_meta_header_are_found_and_read(tmp_path):
    path = write_dicom(tmp_path / "NORMAL" / "film.dcm", file_meta=False)
    bare = tmp_path / "NORMAL" / "IM0001"
    bare.write_bytes(write_dicom(tmp_path / "x.dcm").read_bytes())  # with preamble, no extension
    assert is_image_file(path) and is_image_file(bare)
    assert not is_image_file(tmp_path / "x.txt") and (tmp_path / "x.dcm").exists()
    np.testing.assert_array_equal(np.asarray(open_image(path)), np.asarray(open_image(bare)))
    assert prepare(bare.read_bytes(), 32).shape == (32, 32)  # an upload: detected by its first bytes


def test_a_corrupt_dicom_is_an_image_error_naming_the_file(tmp_path):
    good = write_dicom(tmp_path / "a.dcm").read_bytes()
    bad = tmp_path / "cut.dcm"
    bad.write_bytes(good[: len(good) - 2000])  # pixel data cut short
    with pytest.raises(ImageError, match="cut.dcm"):
        open_image(bad)
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)
    with pytest.raises(ImageError, match="junk.dcm"):
        open_image(junk)


def test_without_pydicom_the_error_names_the_extra(tmp_path, monkeypatch):
    path = write_dicom(tmp_path / "a.dcm")
    monkeypatch.setitem(sys.modules, "pydicom", None)  # import pydicom now raises ImportError
    with pytest.raises(PneumoError, match=r"pneumo\[dicom\]"):
        open_image(path)


# ---------------------------------------------------------------------------------------------
# the five real films (when the shared data is present)
# ---------------------------------------------------------------------------------------------
@pytest.mark.skipif(not SHARED_DICOM.is_dir(), reason=f"shared DICOM films not found at {SHARED_DICOM}")
@pytest.mark.parametrize("name", CHEST_FILES + OTHER_FILES)
def test_real_films_render_the_right_way_round(name, tmp_path):
    path = Path(shutil.copy(SHARED_DICOM / name, tmp_path / name))
    img = open_image(path)
    grey = np.asarray(img)
    assert img.mode == "L" and min(img.size) >= 400
    assert grey.min() <= 40 and grey.max() >= 240  # the full 8-bit range: not a squeezed, nearly black film
    assert 60 <= grey.mean() <= 210
    lateral, central = lateral_and_central(grey)
    if name in CHEST_FILES:  # lungs darker than the mediastinum; a negative would be the other way round
        assert lateral < central - 8, (lateral, central)


# ---------------------------------------------------------------------------------------------
# DICOM folders: patients from PatientID, hashed; nothing identifying written anywhere
# ---------------------------------------------------------------------------------------------
def dicom_tree(root: Path, patients: int = 6, per_patient: int = 2) -> Path:
    for cls, offset, level in (("NORMAL", 0, 0.75), ("PNEUMONIA", 100, 0.55)):
        for p in range(patients):
            for k in range(per_patient):
                att = chest_phantom(seed=offset + 10 * p + k)
                att = (att * (level / 0.75)).astype(np.uint16) if cls == "PNEUMONIA" else att
                write_dicom(root / cls / f"{cls[0]}{p}_{k}.dcm", att, patient_id=f"MRN-{offset + p:05d}")
    return root


def test_patient_comes_from_the_patient_id_tag_as_a_keyed_hash(tmp_path):
    data = discover(dicom_tree(tmp_path / "d"))
    by_file = {s.path.name: s.patient for s in data.samples}
    assert by_file["N0_0.dcm"] == by_file["N0_1.dcm"] != by_file["N1_0.dcm"]
    assert all(p.startswith("dicom-") and "MRN" not in p for p in by_file.values())
    split = make_split(data, valid_pct=0.34)
    assert not {s.patient for s in split.train} & {s.patient for s in split.valid}
    again = discover(dicom_tree(tmp_path / "copy"))  # the same IDs elsewhere: the same hashes (reproducible)
    assert {s.path.name: s.patient for s in again.samples} == by_file


def test_a_dicom_run_leaves_no_identifying_value_anywhere(tmp_path, monkeypatch):
    from pneumo.infer.predict import predict_files
    from pneumo.training.loop import train

    cache = tmp_path / "cache"
    monkeypatch.setenv("PNEUMO_CACHE", str(cache))
    root = dicom_tree(tmp_path / "d")
    report = check_dataset(root, progress=False)
    assert report["totals"]["images"] == 24 and not report.get("unreadable"), report
    with one_torch_thread():
        run = train(root, out=tmp_path / "run", epochs=1, image_size=32, progress=False, valid_pct=0.34)
    rows = predict_files(run.model_dir, [root / "NORMAL"], progress=False)
    assert len(rows) == 12 and all("error" not in r for r in rows)
    written = [p for folder in (tmp_path / "run", cache) for p in folder.rglob("*") if p.is_file()]
    assert any(p.name == "split.json" for p in written) and any(p.suffix == ".npy" for p in written)
    secrets = ["MRN-", PATIENT_NAME, PATIENT_NAME.replace("^", " "), "Janet", STUDY_DATE, BIRTH_DATE]
    for path in written:
        content = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in content, f"{secret!r} written to {path}"
    patients = {
        r["patient"] for r in csv.DictReader(io.StringIO((tmp_path / "run" / "valid_predictions.csv").read_text()))
    }
    assert patients and all(p.startswith("dicom-") for p in patients)
    assert json.loads((tmp_path / "run" / "split.json").read_text())["valid"]
