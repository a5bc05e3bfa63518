"""``pneumo data check``: every problem named, errors separated from warnings, never a traceback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from conftest import kermany_names
from pneumo.cli import main
from pneumo.data.check import check_dataset, format_check
from pneumo.errors import DataError


@pytest.fixture
def broken_root(kaggle_root: Path, write_image) -> Path:
    """The miniature Kaggle tree with a truncated JPEG, an empty file, a text file named .jpeg, an empty class."""
    normal = kaggle_root / "train" / "NORMAL"
    data = write_image(normal / "IM-0900-0001.jpeg", size=(64, 64)).read_bytes()
    (normal / "IM-0900-0001.jpeg").write_bytes(data[: len(data) // 2])
    (normal / "IM-0901-0001.jpeg").write_bytes(b"")
    (kaggle_root / "train" / "PNEUMONIA" / "person900_virus_1.jpeg").write_text("<html>404 Not Found</html>\n")
    for f in (kaggle_root / "test" / "PNEUMONIA").iterdir():
        f.unlink()
    return kaggle_root


def test_clean_kaggle_tree(kaggle_root: Path):
    report = check_dataset(kaggle_root, progress=False)
    json.dumps(report)  # JSON-ready as it is, no default= needed
    assert report["root"] == str(kaggle_root) and report["layout"] == "kaggle"
    assert report["classes"] == ["NORMAL", "PNEUMONIA"]
    assert report["counts"] == {
        "train": {"NORMAL": 12, "PNEUMONIA": 12},
        "valid": {"NORMAL": 8, "PNEUMONIA": 8},
        "test": {"NORMAL": 4, "PNEUMONIA": 4},
    }
    assert report["totals"] == {
        "images": 48,
        "per_split": {"train": 24, "valid": 16, "test": 8},
        "per_class": {"NORMAL": 24, "PNEUMONIA": 24},
    }
    assert report["sizes"] == {
        "width": {"min": 32, "max": 32},
        "height": {"min": 32, "max": 32},
        "modes": {"L": 48},
        "bit_depths": {"8": 48},
    }
    assert report["errors"] == [] and report["unreadable"] == [] and report["duplicates"] == []
    assert report["patients_across_splits"] == []
    assert report["subtypes"]["train"] == {"PNEUMONIA/bacteria": 6, "PNEUMONIA/virus": 6}
    val_warning = [w for w in report["warnings"] if "only 16 images" in w]
    assert len(val_warning) == 1 and str(kaggle_root / "val") in val_warning[0]
    assert "folds it into train and splits by patient; --keep-val keeps it" in val_warning[0]
    text = format_check(report)
    assert "OK: no errors" in text and "only 16 images" in text


def test_broken_folder_names_every_problem(broken_root: Path):
    report = check_dataset(broken_root, progress=False)
    reasons = {u["path"]: u["reason"] for u in report["unreadable"]}
    assert set(reasons) == {
        "train/NORMAL/IM-0900-0001.jpeg",
        "train/NORMAL/IM-0901-0001.jpeg",
        "train/PNEUMONIA/person900_virus_1.jpeg",
    }
    assert "truncated" in reasons["train/NORMAL/IM-0900-0001.jpeg"]
    assert "empty file" in reasons["train/NORMAL/IM-0901-0001.jpeg"]
    assert "not an image" in reasons["train/PNEUMONIA/person900_virus_1.jpeg"]
    assert len(report["errors"]) == 1
    assert str(broken_root / "test" / "PNEUMONIA") in report["errors"][0]
    assert "empty class folder" in report["errors"][0]
    for path in reasons:
        assert any(path in w for w in report["warnings"])
    assert report["duplicates"] == []  # an empty file is unreadable, not a duplicate of anything
    text = format_check(report)
    for needle in [*reasons, "truncated", str(broken_root / "test" / "PNEUMONIA"), "FAILED: 1 error"]:
        assert needle in text


def test_cli_exit_code_and_json(broken_root: Path, kaggle_root: Path, capsys):
    assert main(["data", "check", str(broken_root), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert len(report["unreadable"]) == 3 and report["errors"]
    shutil.rmtree(broken_root / "test")  # the empty class goes with it
    assert main(["data", "check", str(kaggle_root)]) == 0
    assert "OK: no errors" in capsys.readouterr().out


def test_split_missing_a_class_is_an_error(kaggle_root: Path):
    shutil.rmtree(kaggle_root / "test" / "PNEUMONIA")
    report = check_dataset(kaggle_root, progress=False)
    assert report["counts"]["test"] == {"NORMAL": 4, "PNEUMONIA": 0}
    assert len(report["errors"]) == 1
    assert str(kaggle_root / "test") in report["errors"][0] and "no 'PNEUMONIA' folder" in report["errors"][0]


@pytest.mark.parametrize(
    "setup, needle",
    [
        (lambda root: None, "no such folder"),
        (lambda root: [(root / c).mkdir(parents=True) for c in ("NORMAL", "PNEUMONIA")], "no JPEG or PNG images"),
        (lambda root: (root / "notes.txt").parent.mkdir() or (root / "notes.txt").write_text("x"), "no class folders"),
    ],
)
def test_unusable_root_is_an_error_not_a_traceback(tmp_path: Path, setup, needle, capsys):
    root = tmp_path / "data"
    setup(root)
    report = check_dataset(root, progress=False)
    assert len(report["errors"]) == 1 and needle in report["errors"][0] and str(root) in report["errors"][0]
    assert report["layout"] is None and report["totals"]["images"] == 0
    json.dumps(report)
    assert "FAILED: 1 error" in format_check(report)
    assert main(["data", "check", str(root)]) == 1


def test_single_class_is_an_error(tmp_path: Path, make_tree):
    root = make_tree(tmp_path / "d", {"train/NORMAL": ["IM-0001-0001.jpeg"], "test/NORMAL": ["IM-0002-0001.jpeg"]})
    errors = check_dataset(root, progress=False)["errors"]
    assert len(errors) == 1 and "only one class (NORMAL)" in errors[0]


def test_duplicates_and_patients_across_splits(kaggle_root: Path):
    src = kaggle_root / "train" / "NORMAL" / "IM-0100-0001.jpeg"
    shutil.copy(src, kaggle_root / "test" / "PNEUMONIA" / "person777_virus_1.jpeg")  # a copy relabelled
    shutil.copy(src, kaggle_root / "train" / "NORMAL" / "IM-0100-0003.jpeg")  # same patient, same split
    other = kaggle_root / "train" / "PNEUMONIA" / "person101_bacteria_1011.jpeg"
    shutil.copy(other, kaggle_root / "test" / "PNEUMONIA" / "person101_bacteria_1019.jpeg")
    report = check_dataset(kaggle_root, progress=False)
    groups = {tuple(g["files"]): g for g in report["duplicates"]}
    assert len(groups) == 2
    relabelled = groups[
        ("train/NORMAL/IM-0100-0001.jpeg", "train/NORMAL/IM-0100-0003.jpeg", "test/PNEUMONIA/person777_virus_1.jpeg")
    ]
    assert relabelled["conflicting_labels"] and relabelled["across_splits"] and relabelled["across_patients"]
    assert relabelled["classes"] == ["NORMAL", "PNEUMONIA"] and relabelled["splits"] == ["train", "test"]
    same_patient = groups[
        ("train/PNEUMONIA/person101_bacteria_1011.jpeg", "test/PNEUMONIA/person101_bacteria_1019.jpeg")
    ]
    assert same_patient["across_splits"] and not same_patient["conflicting_labels"]
    assert report["patients_across_splits"] == [{"patient": "person101", "counts": {"train": 2, "test": 1}}]
    assert report["errors"] == []
    joined = "\n".join(report["warnings"])
    for needle in (
        "2 groups of byte-identical files (3 extra copies)",
        "1 patient in more than one split",
        "identical images with different labels (1)",
        "identical images in more than one split (2)",
        "person101 (train 2, test 1)",
    ):
        assert needle in joined
    assert "DIFFERENT LABELS" in format_check(report)


def test_sizes_modes_and_bit_depths(tmp_path: Path, write_image):
    root = tmp_path / "mixed"
    write_image(root / "NORMAL" / "a.png", size=(40, 300), mode="I;16")
    write_image(root / "NORMAL" / "b.jpeg", size=(120, 80), mode="RGB")
    write_image(root / "PNEUMONIA" / "c.jpeg", size=(64, 64), mode="L")
    write_image(root / "PNEUMONIA" / "d.png", size=(500, 20), mode="L")
    report = check_dataset(root, progress=False)
    assert report["layout"] == "classes" and report["counts"] == {"train": {"NORMAL": 2, "PNEUMONIA": 2}}
    assert report["sizes"] == {
        "width": {"min": 40, "max": 500},
        "height": {"min": 20, "max": 300},
        "modes": {"L": 2, "I;16": 1, "RGB": 1},
        "bit_depths": {"16": 1, "8": 3},
    }
    text = format_check(report)
    assert "width 40-500 px" in text and "16-bit 1" in text


def test_class_imbalance_warning(tmp_path: Path, make_tree):
    root = make_tree(
        tmp_path / "d",
        {"NORMAL": kermany_names("NORMAL", 2, 1), "PNEUMONIA": kermany_names("PNEUMONIA", 6, 1)},
        size=(8, 8),
    )
    warnings = check_dataset(root, progress=False)["warnings"]
    assert any("train is imbalanced: PNEUMONIA 6 vs NORMAL 2 (3.0:1)" in w for w in warnings)


def test_unknown_patient_rule_is_a_usage_error(kaggle_root: Path):
    with pytest.raises(DataError, match="unknown patient rule"):
        check_dataset(kaggle_root, patient_rule="nope", progress=False)


def test_bundled_sample_checks_clean(sample_root: Path):
    report = check_dataset(sample_root, progress=False)
    assert report["counts"] == {"train": {"NORMAL": 100, "PNEUMONIA": 100}, "test": {"NORMAL": 30, "PNEUMONIA": 30}}
    assert report["errors"] == [] and report["unreadable"] == []
    assert report["patients_across_splits"] == []  # the sample was drawn without leaking patients
    assert report["sizes"]["width"] == {"min": 224, "max": 224}


def test_class_with_only_unreadable_images_is_an_error(tmp_path: Path, make_tree):
    root = make_tree(tmp_path / "d", {"NORMAL": ["IM-0001-0001.jpeg"], "PNEUMONIA": []})
    for i in range(2):
        (root / "PNEUMONIA" / f"person{i}_virus_{i}.jpeg").write_bytes(b"")
    report = check_dataset(root, progress=False)
    assert len(report["unreadable"]) == 2
    assert report["errors"] == [
        f"{root / 'PNEUMONIA'}: none of its 2 images can be read; training would see no PNEUMONIA"
    ]


def test_a_lone_class_folder_is_reported_as_one_class(tmp_path: Path, make_tree):
    root = make_tree(tmp_path / "d", {"NORMAL": kermany_names("NORMAL", 3, 1)})
    errors = check_dataset(root, progress=False)["errors"]
    assert len(errors) == 1 and "only one class (NORMAL)" in errors[0]


def test_symlinks_other_formats_and_tiny_images_are_findings(tmp_path: Path, make_tree):
    root = make_tree(tmp_path / "d", {"NORMAL": kermany_names("NORMAL", 2, 1), "PNEUMONIA": kermany_names("P", 2, 1)})
    normal = root / "NORMAL"
    (normal / "loop_a.jpeg").symlink_to("loop_b.jpeg")
    (normal / "loop_b.jpeg").symlink_to("loop_a.jpeg")
    (normal / "broken.jpeg").symlink_to("gone.jpeg")
    Image.new("L", (40, 40)).save(normal / "film.gif")
    Image.new("L", (40, 40)).save(normal / "film.tif")
    Image.new("L", (1, 1)).save(normal / "IM-0900-0001.png")
    Image.new("L", (40, 40)).save(normal / "IM-0901-0001.jpeg", format="GIF")  # a GIF named .jpeg
    report = check_dataset(root, progress=False)
    skipped = {item["path"]: item["reason"] for item in report["skipped"]}
    assert set(skipped) == {
        f"NORMAL/{n}" for n in ("loop_a.jpeg", "loop_b.jpeg", "broken.jpeg", "film.gif", "film.tif")
    }
    assert "symlink loop" in skipped["NORMAL/loop_a.jpeg"] and "broken symlink" in skipped["NORMAL/broken.jpeg"]
    assert "GIF file; pneumo reads JPEG and PNG only, so it is skipped" in skipped["NORMAL/film.gif"]
    unreadable = {item["path"]: item["reason"] for item in report["unreadable"]}
    assert unreadable == {
        "NORMAL/IM-0900-0001.png": "image too small (1x1 pixels; at least 8 a side)",
        "NORMAL/IM-0901-0001.jpeg": "a GIF image; pneumo reads JPEG and PNG only (convert it to PNG)",
    }
    assert report["errors"] == []  # each class still has readable images
    text = format_check(report)
    for needle in [*skipped, *unreadable, "symlink loop", "image too small"]:
        assert needle in text


def _non_utf8_tree(root: Path, make_tree) -> Path:
    make_tree(root, {"NORMAL": kermany_names("NORMAL", 3, 1), "PNEUMONIA": kermany_names("PNEUMONIA", 3, 1)})
    normal = os.fsencode(root / "NORMAL")
    os.rename(normal + b"/IM-0100-0001.jpeg", normal + b"/latin1_\xe9\xff.jpeg")
    (root / "NORMAL" / os.fsdecode(b"broken_\xe9.jpeg")).write_bytes(b"\xff\xd8\xff\xe0 not a film")
    return root


def test_names_that_are_not_utf8_print_on_a_strict_terminal_and_in_json(tmp_path: Path, make_tree):
    root = _non_utf8_tree(tmp_path / "d", make_tree)
    env = {**os.environ, "PYTHONIOENCODING": "utf-8:strict", "PYTHONPATH": os.pathsep.join(sys.path)}
    text = subprocess.run(
        [sys.executable, "-m", "pneumo", "data", "check", str(root)], capture_output=True, env=env, check=False
    )
    assert text.returncode == 0, text.stderr.decode(errors="replace")
    out = text.stdout.decode("utf-8")  # strict: valid UTF-8 throughout
    assert "NORMAL/broken_\\xe9.jpeg" in out and "Traceback" not in text.stderr.decode(errors="replace")
    as_json = subprocess.run(
        [sys.executable, "-m", "pneumo", "data", "check", str(root), "--json"], capture_output=True, env=env, check=True
    )
    report = json.loads(as_json.stdout.decode("utf-8"))
    assert report["unreadable"][0]["path"] == "NORMAL/broken_\\xe9.jpeg"
    assert "\\ud" not in as_json.stdout.decode("utf-8")  # no lone surrogates, which strict JSON readers refuse
    assert report["totals"]["images"] == 7
