"""Data on disk: discovery of the layouts people actually have, patient ids, patient-level splits,
the one preprocessing function, and the decode cache."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import KAGGLE_TREE, kermany_names
from pneumo.data.cache import cache_key, decode_images, duplicate_groups, file_digests
from pneumo.data.folders import (
    MIN_USABLE_VALID,
    Sample,
    discover,
    kermany_patient_id,
    make_split,
    patient_rule,
    patients_in_both,
    printable,
    split_by_patient,
    split_random,
    subtype_of,
)
from pneumo.data.imaging import MIN_SIDE, open_image, prepare
from pneumo.errors import DataError, ImageError


def _names(samples) -> set[str]:
    return {s.path.name for s in samples}


# ---------------------------------------------------------------------------------------------
# discovery
# ---------------------------------------------------------------------------------------------
def test_discover_kaggle_layout(kaggle_root: Path):
    data = discover(kaggle_root)
    assert data.layout == "kaggle" and data.root == kaggle_root
    assert data.classes == ["NORMAL", "PNEUMONIA"]
    assert data.splits == ["train", "valid", "test"]  # "val" on disk is "valid" in pneumo
    assert data.counts() == {
        "train": {"NORMAL": 12, "PNEUMONIA": 12},
        "valid": {"NORMAL": 8, "PNEUMONIA": 8},
        "test": {"NORMAL": 4, "PNEUMONIA": 4},
    }
    assert _names(data.split("train")) == set(KAGGLE_TREE["train/NORMAL"] + KAGGLE_TREE["train/PNEUMONIA"])
    by_name = {s.path.name: s for s in data.samples}
    assert by_name["IM-0100-0002.jpeg"].patient == "IM-0100"
    assert data.classes[by_name["person101_bacteria_1011.jpeg"].label] == "PNEUMONIA"
    assert "train: NORMAL=12 PNEUMONIA=12" in repr(data)


def test_macos_litter_and_hidden_files_are_ignored(kaggle_root: Path, write_image):
    write_image(kaggle_root / "train" / "NORMAL" / ".ipynb_checkpoints" / "IM-0999-0001.jpeg")
    write_image(kaggle_root / "train" / ".hidden" / "IM-0998-0001.jpeg")
    (kaggle_root / "train" / "NORMAL" / "Thumbs.db").write_bytes(b"junk")
    (kaggle_root / "train" / "NORMAL" / "notes.txt").write_text("not an image")
    data = discover(kaggle_root)
    assert len(data.samples) == 48
    assert data.classes == ["NORMAL", "PNEUMONIA"]
    for s in data.samples:
        rel = s.path.relative_to(kaggle_root).parts
        assert "__MACOSX" not in rel and not any(part.startswith(".") for part in rel), s.path


@pytest.mark.parametrize("wrapper", ["chest_xray/chest_xray", "archive/chest_xray"])
def test_discover_nested_wrapper_folders(tmp_path: Path, make_tree, wrapper):
    inner = make_tree(
        tmp_path / wrapper, {"train/NORMAL": ["IM-0001-0001.jpeg"], "train/PNEUMONIA": ["person1_virus_1.jpeg"]}
    )
    (tmp_path / wrapper.split("/")[0] / "__MACOSX" / "chest_xray").mkdir(parents=True)  # as the Kaggle zip has
    data = discover(tmp_path / wrapper.split("/")[0])
    assert data.root == inner and data.layout == "kaggle"
    assert data.counts() == {"train": {"NORMAL": 1, "PNEUMONIA": 1}}


def test_discover_class_folders_only(tmp_path: Path, make_tree):
    make_tree(tmp_path / "xrays", {"NORMAL": ["a.png", "b.png"], "PNEUMONIA": ["c.png"], "COVID": ["d.jpg"]})
    data = discover(tmp_path / "xrays")
    assert data.layout == "classes" and data.classes == ["COVID", "NORMAL", "PNEUMONIA"]
    assert data.counts() == {"train": {"COVID": 1, "NORMAL": 2, "PNEUMONIA": 1}}
    assert {s.patient for s in data.samples} == {"a", "b", "c", "d"}  # unknown names: one patient each


def test_discover_finds_every_format_and_size(tmp_path: Path, write_image):
    root = tmp_path / "mixed"
    files = {
        "NORMAL/IM-0001-0001.jpeg": ((40, 30), "L"),
        "NORMAL/IM-0002-0001.JPG": ((64, 64), "RGB"),
        "NORMAL/IM-0003-0001.png": ((50, 90), "I;16"),
        "PNEUMONIA/person1_virus_1.png": ((33, 33), "RGB"),
        "PNEUMONIA/person2_bacteria_2.jpg": ((120, 80), "L"),
        "PNEUMONIA/person3_virus_3.png": ((16, 48), "RGBA"),
    }
    for rel, (size, mode) in files.items():
        write_image(root / rel, size=size, mode=mode)
    with Image.open(root / "NORMAL/IM-0003-0001.png") as img:
        assert img.mode == "I;16"
    data = discover(root)
    assert sorted(s.path.relative_to(root).as_posix() for s in data.samples) == sorted(files)
    for s in data.samples:
        arr = prepare(s.path, 24)
        assert arr.shape == (24, 24) and arr.dtype == np.uint8


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda root: None, "no such folder"),
        (lambda root: [(root / c).mkdir(parents=True) for c in ("NORMAL", "PNEUMONIA")], "no JPEG or PNG images"),
        (lambda root: root.mkdir(), "no class folders"),
    ],
)
def test_discover_bad_roots_raise_data_error(tmp_path: Path, setup, message):
    root = tmp_path / "data"
    setup(root)
    with pytest.raises(DataError, match=message):
        discover(root)


def test_a_flat_folder_of_images_says_where_the_class_folders_should_be(tmp_path: Path, write_image):
    for i in range(3):
        write_image(tmp_path / "flat" / f"IM-{i:04d}-0001.jpeg")
    root = tmp_path / "flat"
    with pytest.raises(DataError) as info:
        discover(root)
    assert str(info.value) == (
        f"found images directly in {root} but no class folders; expected {root}/NORMAL, {root}/PNEUMONIA"
    )


def test_a_lone_class_folder_is_one_class_not_a_wrapper(tmp_path: Path, make_tree):
    """root/NORMAL/*.jpeg is a data set of one class (which check and train refuse by name), not a
    wrapper around a flat folder: it used to be descended into and reported as 'no class folders'."""
    root = make_tree(tmp_path / "d", {"NORMAL": kermany_names("NORMAL", 3, 1)})
    data = discover(root)
    assert data.root == root and data.classes == ["NORMAL"] and len(data.samples) == 3


def test_symlink_problems_and_other_formats_are_skipped_and_named(tmp_path: Path, make_tree, write_image):
    root = make_tree(tmp_path / "d", {"NORMAL": ["IM-0001-0001.jpeg"], "PNEUMONIA": ["person1_virus_1.jpeg"]})
    normal = root / "NORMAL"
    (normal / "loop_a.jpeg").symlink_to("loop_b.jpeg")
    (normal / "loop_b.jpeg").symlink_to("loop_a.jpeg")
    (normal / "broken.png").symlink_to("gone.png")
    (normal / "elsewhere").symlink_to(root / "PNEUMONIA")
    Image.new("L", (40, 40)).save(normal / "film.gif")
    Image.new("L", (40, 40)).save(normal / "film.tiff")
    data = discover(root)
    assert [s.path.name for s in data.samples] == ["IM-0001-0001.jpeg", "person1_virus_1.jpeg"]
    reasons = {p.name: why for p, why in data.skipped}
    assert reasons["loop_a.jpeg"].startswith("symlink loop") and reasons["loop_b.jpeg"].startswith("symlink loop")
    assert reasons["broken.png"].startswith("broken symlink")
    assert reasons["elsewhere"].startswith("symlinked folder, not followed")
    assert "GIF file; pneumo reads JPEG and PNG only" in reasons["film.gif"]
    assert "TIFF file" in reasons["film.tiff"]
    assert len(reasons) == 6


# ---------------------------------------------------------------------------------------------
# patients
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, patient",
    [
        ("person1000_bacteria_2931.jpeg", "person1000"),
        ("person1_virus_6.jpeg", "person1"),
        ("IM-0115-0001.jpeg", "IM-0115"),
        ("NORMAL2-IM-0123-0001.jpeg", "NORMAL2-IM-0123"),
        ("NORMAL2-IM-0587-0001-0002.jpeg", "NORMAL2-IM-0587"),
        ("/some/dir/IM-0115-0002.jpeg", "IM-0115"),
        ("scan_42.png", "scan_42"),  # no pattern: its own patient
    ],
)
def test_kermany_patient_id(name, patient):
    assert kermany_patient_id(name) == patient


@pytest.mark.parametrize(
    "name, subtype",
    [("person1000_bacteria_2931.jpeg", "bacteria"), ("person1_virus_6.jpeg", "virus"), ("IM-0115-0001.jpeg", None)],
)
def test_subtype_of(name, subtype):
    assert subtype_of(name) == subtype


def test_patient_rules():
    assert patient_rule("filename")("IM-0115-0001.jpeg") == "IM-0115-0001"
    assert patient_rule(r"regex:^(\d+)_")("0042_scan.png") == "0042"
    with pytest.raises(DataError, match="unknown patient rule"):
        patient_rule("by-magic")


# ---------------------------------------------------------------------------------------------
# splits on the real file names
# ---------------------------------------------------------------------------------------------
@pytest.fixture(params=["bundled sample", "chest_xray_224"])
def real_pool(request) -> list[Sample]:
    """Training images of real Kaggle data: names only are read (listing a folder is cheap)."""
    root = request.getfixturevalue("sample_root" if request.param == "bundled sample" else "xray_224_root")
    pool = discover(root).split("train")
    assert sum(n > 1 for n in Counter(s.patient for s in pool).values()) > 10  # there are patients to leak
    return pool


def test_patient_split_of_real_names_is_leak_free_stratified_and_seeded(real_pool):
    train, valid = split_by_patient(real_pool, 0.2, seed=42)
    assert patients_in_both(train, valid) == set()
    assert len(train) + len(valid) == len(real_pool) and not _names(train) & _names(valid)
    n_class = Counter(s.label for s in real_pool)
    n_valid = Counter(s.label for s in valid)
    tolerance = 0.06 if len(real_pool) < 1000 else 0.01  # one patient has up to 6 images
    for label, n in n_class.items():
        assert abs(n_valid[label] / n - 0.2) <= tolerance, (label, n_valid[label], n)
    again = split_by_patient(real_pool, 0.2, seed=42)[1]
    assert [s.path for s in again] == [s.path for s in valid]
    other = split_by_patient(real_pool, 0.2, seed=7)[1]
    assert {s.path for s in other} != {s.path for s in valid}
    assert patients_in_both(split_by_patient(real_pool, 0.2, seed=7)[0], other) == set()


def test_random_split_of_real_names_leaks_patients(real_pool):
    train, valid = split_random(real_pool, 0.2, seed=42)
    assert len(valid) == round(0.2 * len(real_pool))
    leaked = patients_in_both(train, valid)
    assert leaked, "the tutorial's random split is expected to put one patient on both sides"
    split = make_split(discover(real_pool[0].path.parents[2]), valid_pct=0.2, method="random")
    assert any("random image split" in note for note in split.notes)


def test_split_by_patient_honours_extra_groups():
    samples = [Sample(Path(f"{i}.jpeg"), i % 2, "train", f"p{i}") for i in range(40)]
    groups = {Path("0.jpeg"): "dup", Path("2.jpeg"): "dup"}  # two patients sharing one image file
    for seed in range(10):
        train, valid = split_by_patient(samples, 0.3, seed=seed, groups=groups)
        sides = {s.path.name for s in valid} & {"0.jpeg", "2.jpeg"}
        assert len(sides) in (0, 2)
    with pytest.raises(DataError, match="valid_pct"):
        split_by_patient(samples, 1.5)


def test_patients_joined_by_a_shared_file_are_dealt_whole():
    """Two patients with three films each share one byte-identical file: all six films, not just the
    two copies, must land on one side, or the patient split leaks those patients."""
    samples = [Sample(Path(f"p{p}_{k}.jpeg"), p % 2, "train", f"p{p}") for p in range(30) for k in range(3)]
    groups = {Path("p0_0.jpeg"): "copy", Path("p1_2.jpeg"): "copy"}
    for seed in range(12):
        train, valid = split_by_patient(samples, 0.3, seed=seed, groups=groups)
        assert not patients_in_both(train, valid)
        assert {s.patient for s in valid} >= {"p0", "p1"} or not {s.patient for s in valid} & {"p0", "p1"}
    joined = [split_by_patient(samples, 0.3, seed=seed, groups=groups) for seed in range(12)]
    assert any("p0" in {s.patient for s in valid} for _, valid in joined)  # the joined pair does get dealt


def test_duplicate_groups_are_found_by_content_and_cached_without_names(tmp_path: Path, write_image, monkeypatch):
    a = write_image(tmp_path / "a" / "IM-0001-0001.jpeg")
    b = tmp_path / "b" / "person7_virus_9.jpeg"
    b.parent.mkdir()
    b.write_bytes(a.read_bytes())
    c = write_image(tmp_path / "a" / "IM-0002-0001.jpeg")
    cache = tmp_path / "cache"
    assert duplicate_groups([a, b, c], cache_dir=cache, progress=False) == {
        a: file_digests([a], cache)[0],
        b: file_digests([b], cache)[0],
    }
    stored = list(cache.glob("digests-*.json"))
    assert stored and not any(name in f.read_text() for f in stored for name in ("IM-0001", "person7"))
    calls = []
    monkeypatch.setattr(Path, "read_bytes", lambda self: calls.append(self) or b"")
    assert len(duplicate_groups([a, b, c], cache_dir=cache, progress=False)) == 2 and not calls  # from the cache


# ---------------------------------------------------------------------------------------------
# the val folder
# ---------------------------------------------------------------------------------------------
def test_tiny_val_folder_is_folded_into_train_with_a_note(kaggle_root: Path):
    data = discover(kaggle_root)
    split = make_split(data, seed=0)
    assert split.method == "patient"
    assert len(split.notes) == 1 and "only 16 images" in split.notes[0] and "--keep-val" in split.notes[0]
    assert len(split.train) + len(split.valid) == 24 + 16  # train + val pooled, test never touched
    assert not {s.split for s in split.train + split.valid} & {"test"}
    assert patients_in_both(split.train, split.valid) == set()
    kept = make_split(data, keep_small_valid=True)
    assert kept.method == "folder" and _names(kept.valid) == _names(data.split("valid"))


def test_usable_val_folder_is_used_as_is(tmp_path: Path, make_tree):
    n = MIN_USABLE_VALID // 2
    root = make_tree(
        tmp_path / "d",
        {
            "train/NORMAL": kermany_names("NORMAL", 3, 1),
            "train/PNEUMONIA": kermany_names("PNEUMONIA", 3, 1),
            "val/NORMAL": kermany_names("NORMAL", n, 1, start=1000),
            "val/PNEUMONIA": kermany_names("PNEUMONIA", n, 1, start=1000),
        },
        size=(8, 8),
    )
    data = discover(root)
    split = make_split(data)
    assert split.method == "folder" and len(split.valid) == 2 * n and not split.notes
    resplit = make_split(data, valid_pct=0.25)  # an explicit fraction re-splits the pooled images
    assert resplit.method == "patient" and len(resplit.train) + len(resplit.valid) == 6 + 2 * n


# ---------------------------------------------------------------------------------------------
# preprocessing
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode, size", [("L", (40, 30)), ("RGB", (64, 80)), ("RGBA", (30, 30)), ("I;16", (50, 70))])
def test_prepare_gives_square_uint8_grey(tmp_path: Path, write_image, mode, size):
    path = write_image(tmp_path / "img.png", size=size, mode=mode)
    for source in (path, path.read_bytes(), open_image(path)):
        arr = prepare(source, 32)
        assert arr.shape == (32, 32) and arr.dtype == np.uint8
        assert arr.max() > 100 and arr.min() < 100  # the gradient survived, not blank


def test_16_bit_grey_is_scaled_by_its_own_maximum(tmp_path: Path, write_image):
    path = write_image(tmp_path / "flat12bit.png", size=(20, 20), mode="I;16", value=4095)
    with Image.open(path) as img:
        assert img.mode == "I;16" and np.asarray(img).max() == 4095
    assert (prepare(path, 16) == 255).all()  # a 12-bit white is white, not 4095/65535 grey


def test_rgb_x_ray_equals_its_grey_version(tmp_path: Path, write_image):
    grey = write_image(tmp_path / "g.png", size=(40, 40), mode="L")
    rgb = tmp_path / "rgb.png"
    Image.open(grey).convert("RGB").save(rgb)
    assert np.array_equal(prepare(grey, 24), prepare(rgb, 24))


@pytest.mark.parametrize(
    "make, reason",
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("this is a text file, not an X-ray\n"), "not an image"),
        ("truncate", "truncated"),
        (lambda p: Image.new("L", (1, 1)).save(p, format="PNG"), rf"image too small \(1x1 pixels; at least {MIN_SIDE}"),
        (lambda p: Image.new("L", (40, MIN_SIDE - 1)).save(p, format="PNG"), "image too small"),
        (lambda p: Image.new("L", (40, 40)).save(p, format="GIF"), "a GIF image; pneumo reads JPEG and PNG only"),
        (lambda p: Image.new("I;16", (40, 40)).save(p, format="TIFF"), "a TIFF image"),
    ],
)
def test_open_image_names_the_problem(tmp_path: Path, write_image, make, reason):
    path = tmp_path / "bad.jpeg"
    if make == "truncate":
        data = write_image(tmp_path / "good.jpeg", size=(64, 64)).read_bytes()
        path.write_bytes(data[: len(data) // 2])
    else:
        make(path)
    with pytest.raises(ImageError, match=reason) as info:
        open_image(path)
    assert info.value.path == str(path) and str(path) in str(info.value)


def _film(size: tuple[int, int] = (48, 32)) -> Image.Image:
    """An asymmetric grey film: any rotation or mirror of it differs from it."""
    w, h = size
    arr = (np.add.outer(np.arange(h) * 3, np.arange(w) ** 1.5) % 256).astype(np.uint8)
    arr[: h // 4, : w // 5] = 255  # a bright marker in the top left corner
    return Image.fromarray(arr, mode="L")


@pytest.mark.parametrize(
    "orientation, stored_as",
    [
        (3, Image.Transpose.ROTATE_180),
        (6, Image.Transpose.ROTATE_90),
        (8, Image.Transpose.ROTATE_270),
        (2, Image.Transpose.FLIP_LEFT_RIGHT),
    ],
)
def test_exif_orientation_gives_the_upright_film(tmp_path: Path, orientation, stored_as):
    """A camera stores the pixels as the sensor saw them and the turn in the EXIF tag: the film must
    reach the model upright, the same pixels as the film saved upright."""
    upright = _film()
    upright.save(tmp_path / "upright.png")
    exif = Image.Exif()
    exif[0x0112] = orientation  # Orientation
    upright.transpose(stored_as).save(tmp_path / "tagged.png", exif=exif)
    with Image.open(tmp_path / "tagged.png") as raw:
        assert raw.size != upright.size or np.asarray(raw).tolist() != np.asarray(upright).tolist()
    assert np.array_equal(np.asarray(open_image(tmp_path / "tagged.png")), np.asarray(upright))
    tagged_bytes = (tmp_path / "tagged.png").read_bytes()
    for source in (tmp_path / "tagged.png", tagged_bytes):
        assert np.array_equal(prepare(source, 32), prepare(tmp_path / "upright.png", 32))


def test_names_that_are_not_utf8_are_read_and_printed_safely(tmp_path: Path, write_image):
    folder = write_image(tmp_path / "IM-0001-0001.jpeg").parent
    raw = os.fsencode(folder) + b"/latin1_\xe9\xff.jpeg"
    os.rename(os.fsencode(folder / "IM-0001-0001.jpeg"), raw)
    path = Path(os.fsdecode(raw))
    assert cache_key([path], 16)  # was a UnicodeEncodeError: the key encoded the path as strict UTF-8
    out = decode_images([path], 16, cache_dir=tmp_path / "cache", progress=False)
    assert out.ok.all() and np.asarray(out.pixels).any()
    assert decode_images([path], 16, cache_dir=tmp_path / "cache", progress=False).from_cache
    shown = printable(path)
    assert shown.endswith("latin1_\\xe9\\xff.jpeg") and shown.encode("utf-8")  # strict UTF-8 takes it
    assert printable("NORMAL/é.jpeg") == "NORMAL/é.jpeg"  # valid names are left alone


# ---------------------------------------------------------------------------------------------
# the decode cache
# ---------------------------------------------------------------------------------------------
def test_decode_images_caches_and_notices_changes(tmp_path: Path, write_image):
    paths = [write_image(tmp_path / "imgs" / f"IM-{i:04d}-0001.png", size=(40, 30)) for i in range(4)]
    cache = tmp_path / "cache"
    first = decode_images(paths, 16, cache_dir=cache, progress=False)
    assert not first.from_cache and first.ok.all() and first.errors == {}
    assert first.pixels.shape == (4, 16, 16) and first.pixels.dtype == np.uint8
    assert np.array_equal(first.pixels[2], prepare(paths[2], 16))
    second = decode_images(paths, 16, cache_dir=cache, progress=False)
    assert second.from_cache and np.array_equal(np.asarray(second.pixels), first.pixels)
    assert not decode_images(paths, 24, cache_dir=cache, progress=False).from_cache  # size is in the key

    key = cache_key(paths, 16)
    st = os.stat(paths[1])
    os.utime(paths[1], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # touched
    assert cache_key(paths, 16) != key
    write_image(paths[1], size=(40, 30), value=255)  # and edited: the new pixels must be read
    third = decode_images(paths, 16, cache_dir=cache, progress=False)
    assert not third.from_cache and (third.pixels[1] == 255).all()
    assert np.array_equal(third.pixels[0], first.pixels[0])


def test_decode_images_reports_a_corrupt_file_and_goes_on(tmp_path: Path, write_image):
    good = [write_image(tmp_path / f"ok{i}.jpeg", size=(32, 32)) for i in range(3)]
    bad = tmp_path / "bad.jpeg"
    bad.write_bytes(good[0].read_bytes()[:200])
    paths = [good[0], bad, good[1], good[2]]
    for attempt in range(2):  # decoded, then from the cache: the error survives both
        out = decode_images(paths, 16, cache_dir=tmp_path / "cache", progress=False)
        assert out.from_cache == (attempt == 1)
        assert out.ok.tolist() == [True, False, True, True]
        assert list(out.errors) == [str(bad)] and "truncated" in out.errors[str(bad)]
        assert (np.asarray(out.pixels[1]) == 0).all() and np.asarray(out.pixels[0]).any()
