"""Training on awkward data: what ``data check`` fails is refused before any work, unreadable files are
named, byte-identical copies stay on one side of the split, and names that are not UTF-8 go through
train, lr-find, predict and evaluate."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from conftest import kermany_names, one_torch_thread
from pneumo.config import TrainConfig
from pneumo.errors import DataError
from pneumo.training.loop import train
from pneumo.training.setup import load_data

TINY = dict(epochs=1, image_size=32, feature_views=1, bn_adapt_images=8, batch_size=8, seed=3, progress=False)


def _refused(root: Path, out: Path, match: str, **options) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        train(root, out=str(out), **{**TINY, **options})
    assert not out.exists(), "a refused run must not leave a run folder holding only config.json"
    return info.value


def test_one_class_is_refused_before_any_work(tmp_path: Path, make_tree):
    root = make_tree(tmp_path / "d", {"train/NORMAL": kermany_names("NORMAL", 4, 1)})
    error = _refused(root, tmp_path / "runs" / "one", r"only one class \(NORMAL\)")
    assert "`pneumo data check` fails it" in str(error)
    assert not (tmp_path / "runs").exists()  # the parent this run made goes too


def test_an_empty_class_folder_is_refused(tmp_path: Path, make_tree):
    root = make_tree(tmp_path / "d", {"NORMAL": kermany_names("NORMAL", 4, 1), "PNEUMONIA": kermany_names("P", 4, 1)})
    (root / "COVID").mkdir()
    _refused(root, tmp_path / "run", f"{root / 'COVID'}: empty class folder")


def test_a_flat_folder_says_where_the_class_folders_go(tmp_path: Path, make_tree):
    root = make_tree(tmp_path / "d", {".": kermany_names("NORMAL", 4, 1)})
    _refused(root, tmp_path / "run", f"found images directly in {root} but no class folders; expected {root}/NORMAL")


def test_what_the_user_had_in_out_is_kept(tmp_path: Path, make_tree):
    root = make_tree(tmp_path / "d", {"NORMAL": kermany_names("NORMAL", 4, 1)})
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(DataError):
        train(root, out=str(out), **TINY)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("side", ["training", "validation"])
def test_all_unreadable_images_on_a_side_are_a_named_error(tmp_path: Path, make_tree, side):
    layout = {
        f"{s}/{c}": kermany_names(c, 4, 1, start=100 + 50 * i)
        for i, s in enumerate(["train", "val"])
        for c in ["NORMAL", "PNEUMONIA"]
    }
    root = make_tree(tmp_path / "d", layout)
    broken = root / ("train" if side == "training" else "val")
    for i, f in enumerate(sorted(broken.rglob("*.jpeg"))):
        f.write_bytes(b"not a film %d" % i)
    error = _refused(root, tmp_path / "run", f"all 8 {side} images are unreadable", keep_val=True)
    assert "e.g. " in str(error) and "not an image PIL can read" in str(error)


def test_a_class_left_without_readable_images_is_a_named_error(tmp_path: Path, make_tree):
    root = make_tree(tmp_path / "d", {"NORMAL": kermany_names("NORMAL", 10, 1), "PNEUMONIA": kermany_names("P", 10, 1)})
    for i, f in enumerate(sorted((root / "PNEUMONIA").iterdir())):
        f.write_bytes(b"" if i % 2 else b"junk %d" % i)
    _refused(root, tmp_path / "run", "no readable training images of PNEUMONIA")


def test_byte_identical_films_of_two_patients_land_on_one_side(tmp_path: Path, make_tree):
    """The same film filed under two patients: training passes the copies to the patient split as a
    group, so both patients (all their films) are dealt together, whatever the seed."""
    layout = {"NORMAL": kermany_names("NORMAL", 12, 2), "PNEUMONIA": kermany_names("PNEUMONIA", 12, 2)}
    root = make_tree(tmp_path / "d", layout)
    copy_of = root / "NORMAL" / "IM-0101-0002.jpeg"
    copy_of.write_bytes((root / "NORMAL" / "IM-0100-0001.jpeg").read_bytes())
    apart_without_groups = 0
    for seed in range(8):
        data = load_data(TrainConfig.from_dict({"data": str(root), "image_size": 32, "seed": seed}), progress=False)
        valid = {s.patient for s in data.valid}
        assert ({"IM-0100", "IM-0101"} <= valid) or not ({"IM-0100", "IM-0101"} & valid), f"seed {seed}"
        data = load_data(
            TrainConfig.from_dict({"data": str(root), "image_size": 32, "seed": seed, "split": "random"}),
            progress=False,
        )
        valid = {s.path.name for s in data.valid}
        apart_without_groups += len(valid & {"IM-0100-0001.jpeg", "IM-0101-0002.jpeg"}) == 1
    assert apart_without_groups  # the pair can be torn apart: the check above is not vacuous


def test_names_that_are_not_utf8_go_through_train_lr_find_predict_and_evaluate(tmp_path: Path, make_tree):
    from pneumo.infer.predict import evaluate_model_on_folder, predict_files, write_predictions
    from pneumo.training.lr_finder import lr_find

    layout = {
        f"{s}/{c}": kermany_names(c, n, 1, start=100 + 50 * i)
        for i, (s, n) in enumerate([("train", 10), ("test", 3)])
        for c in ["NORMAL", "PNEUMONIA"]
    }
    root = make_tree(tmp_path / "d", layout)
    for split in ("train", "test"):
        for cls in ("NORMAL", "PNEUMONIA"):
            folder = os.fsencode(root / split / cls)
            for k, name in enumerate(sorted(os.listdir(folder))[:3]):
                os.rename(folder + b"/" + name, folder + b"/latin1_\xe9\xff_%d_" % k + name)
    (root / "train" / "NORMAL" / os.fsdecode(b"broken_\xe9.jpeg")).write_bytes(b"not a film")
    with one_torch_thread():
        result = train(root, out=str(tmp_path / "run"), **TINY)
        found = lr_find(root, out=tmp_path / "lr", num_it=5, **{k: v for k, v in TINY.items() if k != "epochs"})
        rows = predict_files(result.model_dir, [root / "test"], progress=False)
        report = evaluate_model_on_folder(result.model_dir, root, out=tmp_path / "eval", progress=False)
    assert any("broken_\\xe9.jpeg" in note for note in result.notes)
    assert found.suggestion > 0
    split = json.loads((result.run_dir / "split.json").read_bytes().decode("utf-8"))
    assert sum("latin1_\\xe9\\xff" in p for p in split["train"] + split["valid"]) == 6
    (result.run_dir / "valid_predictions.csv").read_bytes().decode("utf-8")  # valid UTF-8, every row
    assert len(rows) == 6 and all("label" in r for r in rows)
    for fmt in ("json", "csv", "table"):
        with open(tmp_path / f"out.{fmt}", "w", encoding="utf-8", errors="strict") as stream:
            write_predictions(rows, fmt, stream)  # a strict UTF-8 stream takes every name
    printed = json.loads((tmp_path / "out.json").read_text())
    assert sum("latin1_\\xe9\\xff" in r["path"] for r in printed) == 6
    assert report["n"] == 6  # evaluate read every test film, the renamed ones too


def _mapped_file(block) -> str | None:
    """The file ``block``'s memory lies in, when it is a view of a memory map (else None)."""
    import numpy as np

    while block is not None:
        if isinstance(block, np.memmap):
            return str(block.filename)
        block = block.base
    return None


def test_training_pixels_stay_mapped_from_the_decode_cache(tmp_path: Path, make_tree, monkeypatch):
    """The ranks of a distributed run share one copy of the pixels per node: training reads views of
    the memory-mapped decode cache, fresh or reused, never a private copy; a write to them stays in
    that process and never reaches the cache. With an unreadable film the readable rows are copied."""
    import numpy as np

    monkeypatch.setenv("PNEUMO_CACHE", str(tmp_path / "cache"))
    root = make_tree(tmp_path / "d", {"NORMAL": kermany_names("NORMAL", 8, 1), "PNEUMONIA": kermany_names("P", 8, 1)})
    cfg = TrainConfig.from_dict({"data": str(root), "image_size": 32, "seed": 0})
    first = load_data(cfg, progress=False)  # decoded and written
    again = load_data(cfg, progress=False)  # read back
    for data in (first, again):
        for block in (data.train_pixels, data.valid_pixels):
            assert _mapped_file(block) and Path(_mapped_file(block)).parent == tmp_path / "cache"
            assert block.flags.writeable  # torch.from_numpy takes it without a warning
    kept = again.train_pixels[0].copy()
    first.train_pixels[0] = 7
    assert np.array_equal(load_data(cfg, progress=False).train_pixels[0], kept)

    (root / "NORMAL" / "IM-0100-0001.jpeg").write_bytes(b"not a film")
    data = load_data(cfg, progress=False)
    assert _mapped_file(data.train_pixels) is None or _mapped_file(data.valid_pixels) is None
    assert len(data.train_pixels) + len(data.valid_pixels) == 15
