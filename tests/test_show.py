"""``pneumo show-batch``: a seeded grid of training images, labelled right, written as a PNG."""

from __future__ import annotations

import os
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pytest
from PIL import Image

import pneumo.data.cache
import pneumo.plots
from conftest import KAGGLE_TREE
from pneumo.cli import main
from pneumo.data.show import show_batch
from pneumo.errors import PneumoError

# Flat images whose brightness gives their class away, so a title can be checked against its pixels.
VALUES = {"NORMAL": 30, "PNEUMONIA": 220}


@pytest.fixture
def flat_root(tmp_path: Path, make_tree) -> Path:
    return make_tree(tmp_path / "chest_xray", KAGGLE_TREE, values=VALUES)


@pytest.fixture
def drawn(monkeypatch):
    """Record what show_batch decodes and draws, while still writing the real PNG."""
    seen: dict = {"paths": []}
    real_decode, real_grid = pneumo.data.cache.decode_images, pneumo.plots.plot_image_grid

    def decode(paths, *args, **kwargs):
        seen["paths"] += [Path(p) for p in paths]
        return real_decode(paths, *args, **kwargs)

    def grid(images, titles, path, **kwargs):
        seen.update(images=[np.asarray(i).copy() for i in images], titles=list(titles), **kwargs)
        return real_grid(images, titles, path, **kwargs)

    monkeypatch.setattr(pneumo.data.cache, "decode_images", decode)
    monkeypatch.setattr(pneumo.plots, "plot_image_grid", grid)
    return seen


def _png(path: Path) -> tuple[int, int]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        return img.size


@pytest.mark.parametrize("augment", [False, True])
def test_grid_of_labelled_training_images(flat_root: Path, tmp_path: Path, drawn, augment):
    out = show_batch(flat_root, tmp_path / "shots" / "batch.png", rows=2, cols=3, image_size=32, augment=augment)
    assert out == tmp_path / "shots" / "batch.png"
    width, height = _png(out)
    assert width > height  # three columns, two rows
    assert drawn["ncols"] == 3 and len(drawn["images"]) == len(drawn["titles"]) == 6
    assert all(p.relative_to(flat_root).parts[0] == "train" for p in drawn["paths"])  # never val or test
    assert len(set(drawn["paths"])) == 6
    for img, title in zip(drawn["images"], drawn["titles"]):
        assert img.shape == (32, 32) and img.dtype == np.uint8
        assert abs(float(img.mean()) - VALUES[title]) < 40, (title, img.mean())  # the label fits the pixels
    assert ("augmented" in drawn["suptitle"]) and (("not augmented" in drawn["suptitle"]) != augment)
    assert plt.get_fignums() == []


def test_same_seed_same_batch(flat_root: Path, tmp_path: Path, drawn):
    show_batch(flat_root, tmp_path / "a.png", rows=2, image_size=16, seed=3)
    first = (drawn["paths"][:], [i.copy() for i in drawn["images"]])
    drawn["paths"].clear()
    show_batch(flat_root, tmp_path / "b.png", rows=2, image_size=16, seed=3)
    assert drawn["paths"] == first[0] and all(np.array_equal(a, b) for a, b in zip(first[1], drawn["images"]))
    drawn["paths"].clear()
    show_batch(flat_root, tmp_path / "c.png", rows=2, image_size=16, seed=4)
    assert drawn["paths"] != first[0]


def test_class_folder_root_and_small_pools(tmp_path: Path, make_tree, drawn):
    root = make_tree(tmp_path / "xrays", {"NORMAL": ["a.png", "b.png"], "PNEUMONIA": ["c.png"]}, values=VALUES)
    show_batch(root, tmp_path / "out.png", rows=3, image_size=16, augment=False)  # asks for 9, has 3
    assert sorted(p.name for p in drawn["paths"]) == ["a.png", "b.png", "c.png"]
    assert sorted(drawn["titles"]) == ["NORMAL", "NORMAL", "PNEUMONIA"]


def test_unreadable_images_are_skipped(tmp_path: Path, make_tree, drawn):
    root = make_tree(tmp_path / "xrays", {"NORMAL": ["a.png"], "PNEUMONIA": ["b.png"]}, values=VALUES)
    (root / "NORMAL" / "broken.png").write_text("not a png")
    show_batch(root, tmp_path / "out.png", rows=2, image_size=16, augment=False)
    assert len(drawn["paths"]) == 3 and sorted(drawn["titles"]) == ["NORMAL", "PNEUMONIA"]


def test_bad_arguments(flat_root: Path, tmp_path: Path):
    with pytest.raises(PneumoError, match="rows and cols"):
        show_batch(flat_root, tmp_path / "x.png", rows=0)
    assert not (tmp_path / "x.png").exists()


def test_cli_on_the_bundled_sample(sample_root: Path, tmp_path: Path, capsys):
    out = tmp_path / "batch.png"
    assert main(["show-batch", str(sample_root), "--out", str(out), "--rows", "2", "--image-size", "64"]) == 0
    assert str(out) in capsys.readouterr().out
    width, height = _png(out)
    assert 0.8 < width / height < 1.3  # a 2 x 2 grid


def test_an_unwritable_out_is_named_before_any_decoding(flat_root: Path, tmp_path: Path, drawn, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(PneumoError, match=f"{blocker} is a file, not a folder"):
        show_batch(flat_root, blocker / "grid.png", rows=2, image_size=16)
    assert drawn["paths"] == []  # refused before any image was read
    assert main(["show-batch", str(flat_root), "--out", str(blocker / "sub" / "grid.png")]) == 2
    assert "cannot write the picture there" in capsys.readouterr().err


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_out_folder_is_named(flat_root: Path, tmp_path: Path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(PneumoError, match="cannot write the picture there"):
            show_batch(flat_root, folder / "grid.png", rows=2, image_size=16)
    finally:
        folder.chmod(0o755)


def test_names_that_are_not_utf8_are_drawn(tmp_path: Path, make_tree, drawn):
    root = make_tree(tmp_path / "xrays", {"NORMAL": ["a.png"], "PNEUMONIA": ["b.png"]}, values=VALUES)
    os.rename(os.fsencode(root / "NORMAL" / "a.png"), os.fsencode(root / "NORMAL") + b"/latin1_\xe9\xff.png")
    show_batch(root, tmp_path / "out.png", rows=2, image_size=16, augment=False)
    assert sorted(drawn["titles"]) == ["NORMAL", "PNEUMONIA"]
    assert _png(tmp_path / "out.png")
