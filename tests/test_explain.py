"""Grad-CAM (checked against pytorch_grad_cam), overlays at full resolution, and top losses."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pneumo.data.imaging import prepare
from pneumo.errors import ImageError, PneumoError
from pneumo.infer.explain import explain_image, gradcam_heatmap
from pneumo.infer.model_folder import LoadedModel, ModelMeta, load_model
from pneumo.model_meta import write_model_meta
from pneumo.nets.models import BACKBONES, create_model
from pneumo.plots import film_box
from pneumo.report.interpret import interpret_run
from pneumo.run_folder import RunFolder, ValidPredictions

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "pneumo" / "sample_data" / "chest_xray"
from conftest import SHARED_DATA, one_torch_thread  # noqa: E402

FULLRES = SHARED_DATA / "chest_xray_fullres_sample"


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def fullres_image(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real full-resolution X-ray when the shared data is here, else a large generated grey JPEG."""
    found = sorted(FULLRES.glob("PNEUMONIA/*.jpeg"))
    if found:
        return found[0]
    path = tmp_path_factory.mktemp("fullres") / "large.jpeg"
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (1100, 1400), dtype=np.uint8), mode="L").save(path, quality=90)
    return path


def random_model(name: str, size: int = 64) -> LoadedModel:
    torch.manual_seed(0)
    net = create_model(name, num_classes=2, pretrained="none").eval()
    return LoadedModel(net, ModelMeta(arch=name, classes=["A", "B"], image_size=size), torch.device("cpu"))


PIXELS = np.random.default_rng(1).integers(0, 256, (64, 64), dtype=np.uint8)


@pytest.mark.parametrize("name", list(BACKBONES))
def test_cam_layer_of_every_backbone_gives_a_heatmap(name: str) -> None:
    model = random_model(name)
    heats = [gradcam_heatmap(model, PIXELS, t) for t in (0, 1)]
    for heat in heats:
        assert heat.shape == (64, 64) and heat.dtype == np.float32
        assert np.isfinite(heat).all() and heat.min() >= 0.0 and heat.max() <= 1.0
    # Grad-CAM keeps the positive evidence: at least one of the two classes has some, scaled to 1.
    assert max(h.max() for h in heats) == pytest.approx(1.0)
    assert all(p.grad is None for p in model.net.parameters())  # nothing accumulated in .grad


def test_gradcam_matches_pytorch_grad_cam() -> None:
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = random_model("resnet18")
    x = torch.from_numpy(PIXELS).float().div(255).view(1, 1, 64, 64)
    for target in (0, 1):
        with GradCAM(model=model.net, target_layers=[model.net.cam_layer()]) as cam:
            reference = cam(input_tensor=x, targets=[ClassifierOutputTarget(target)])[0]
        np.testing.assert_allclose(gradcam_heatmap(model, PIXELS, target), reference, atol=1e-4)


def test_gradcam_rejects_wrong_input(trained_run: Path) -> None:
    model = load_model(trained_run / "model")
    with pytest.raises(PneumoError, match="uint8"):
        gradcam_heatmap(model, PIXELS.astype(np.float32), 0)
    with pytest.raises(PneumoError, match="out of range"):
        gradcam_heatmap(model, PIXELS, 5)


def test_explain_image_writes_overlay_at_original_resolution(
    trained_run: Path, fullres_image: Path, tmp_path: Path
) -> None:
    result = explain_image(trained_run / "model", fullres_image, tmp_path / "heat.png")
    left, top, width, height = film_box(result["out"])  # the film, never covered by the title strip
    with Image.open(fullres_image) as original, Image.open(result["out"]) as overlay:
        assert (width, height) == original.size and overlay.mode == "RGB" and top > 0
        assert overlay.width > width and overlay.height == height + top  # a colour bar beside, a title above
        assert width > 500  # really full resolution, not the 64 px model input
        assert overlay.text["pneumo:title"].startswith(f"read {result['label']}: p(PNEUMONIA)")
    with pytest.raises(PneumoError, match="exists: pass --overwrite"):
        explain_image(trained_run / "model", fullres_image, tmp_path / "heat.png")
    again = explain_image(trained_run / "model", fullres_image, tmp_path / "heat.png", overwrite=True)
    assert again["reading"] == result["reading"] and again._repr_png_()[:4] == b"\x89PNG"
    model = load_model(trained_run / "model")
    probs = model.probabilities(np.array(prepare(fullres_image, 64))[None])
    predicted = model.classes[int(model.decide(probs)[0])]
    assert result["label"] == predicted == result["target_class"]  # decided at the stored threshold
    p_pneumonia = float(probs[0, model.classes.index("PNEUMONIA")])
    assert result["p_positive"] == pytest.approx(p_pneumonia, abs=1e-5) and result["positive_class"] == "PNEUMONIA"
    assert f"p(PNEUMONIA) {100 * p_pneumonia:.1f} %" in result["reading"]
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert result["threshold"] == pytest.approx(model.meta.threshold)
    assert "grad-cam" in result["method"] and "efficientnet_lite0" in result["method"]


def test_chosen_class_alpha_and_errors(trained_run: Path, tmp_path: Path) -> None:
    model_dir = trained_run / "model"
    image = tmp_path / "xray.png"  # small and non-square: quick, and the overlay must keep the shape
    Image.open(sorted(SAMPLE.glob("test/PNEUMONIA/*.jpeg"))[0]).convert("L").resize((300, 240)).save(image)
    default = explain_image(model_dir, image, tmp_path / "default.png", alpha=0.6)
    other = next(c for c in ["NORMAL", "PNEUMONIA"] if c != default["label"])
    chosen = explain_image(model_dir, image, tmp_path / "chosen.png", target_class=other.lower(), alpha=0.6)
    assert chosen["target_class"] == other and chosen["label"] == default["label"]
    a, b = (
        np.asarray(Image.open(tmp_path / n), dtype=np.int16)[film_box(tmp_path / n)[1] :][:, :300]
        for n in ("default.png", "chosen.png")
    )
    assert np.abs(a - b).mean() > 1.0  # a different class highlights different evidence

    # alpha 0: the film, every row of it (the title sits above it), is the X-ray itself, untouched.
    explain_image(model_dir, image, tmp_path / "clear.png", alpha=0.0)
    left, top, width, height = film_box(tmp_path / "clear.png")
    clear = np.asarray(Image.open(tmp_path / "clear.png"))[top : top + height, left : left + width]
    np.testing.assert_array_equal(clear[..., 0], np.asarray(Image.open(image).convert("L")))
    # in memory, no file: what a notebook shows inline
    shown = explain_image(model_dir, image)
    assert shown["out"] is None and shown.image.size == Image.open(tmp_path / "default.png").size

    with pytest.raises(PneumoError, match="NORMAL, PNEUMONIA"):
        explain_image(model_dir, image, tmp_path / "x.png", target_class="COVID")
    with pytest.raises(PneumoError, match="alpha"):
        explain_image(model_dir, image, tmp_path / "x.png", alpha=1.5)
    with pytest.raises(PneumoError, match="colormap"):
        explain_image(model_dir, image, tmp_path / "x.png", cmap="no-such-map")
    bad = tmp_path / "notes.jpeg"
    bad.write_text("not an x-ray")
    with pytest.raises(ImageError, match="notes.jpeg"):
        explain_image(model_dir, bad, tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


# ---------------------------------------------------------------------------------- interpret_run
def _fake_run(run: Path, threshold: float) -> list[Path]:
    """A run folder (written through RunFolder) with four predictions over small JPEGs, one missing."""
    folder = RunFolder(run)
    classes = ["NORMAL", "PNEUMONIA"]
    write_model_meta(
        folder.model_dir / "model.json",
        ModelMeta(arch="resnet18", classes=classes, image_size=64, threshold=threshold, positive_class="PNEUMONIA"),
    )
    paths = []
    for i in range(4):
        paths.append(run / f"img{i}.jpeg")
        Image.new("L", (90, 70), 60 * i).save(paths[i])
    paths[3].unlink()
    rows = [
        ("NORMAL", 0.10, paths[0]),  # right, loss -log 0.90 (p is p(PNEUMONIA))
        ("PNEUMONIA", 0.60, paths[1]),  # argmax right, but below the 0.7 threshold: wrong
        ("NORMAL", 0.99, paths[2]),  # worst: -log 0.01
        ("PNEUMONIA", 0.20, paths[3]),
    ]  # wrong, -log 0.20; image missing
    p = np.array([r[1] for r in rows])
    folder.write_predictions(
        ValidPredictions(
            classes,
            [str(r[2]) for r in rows],
            np.array([classes.index(r[0]) for r in rows]),
            ["x"] * 4,
            np.stack([1 - p, p], axis=1),
        )
    )
    return paths


def test_interpret_run_ranks_losses_and_respects_threshold(tmp_path: Path) -> None:
    run = tmp_path / "run"
    paths = _fake_run(run, threshold=0.7)
    result = interpret_run(run, out=tmp_path / "out", k=3)
    top = result["top_losses"]
    assert [t["path"] for t in top] == [str(paths[2]), str(paths[3]), str(paths[1])]
    assert [t["loss"] for t in top] == pytest.approx([-math.log(0.01), -math.log(0.2), -math.log(0.6)], rel=1e-4)
    assert (top[0]["actual"], top[0]["predicted"]) == ("NORMAL", "PNEUMONIA")
    # one meaning of probability: p(PNEUMONIA) against the threshold; p(actual) only where labelled so
    assert top[0]["p_positive"] == pytest.approx(0.99) and top[0]["p_actual"] == pytest.approx(0.01)
    assert top[2]["predicted"] == "NORMAL" and top[2]["p_positive"] == pytest.approx(0.6)  # 0.6 < 0.7
    assert top[2]["reading"] == "p(PNEUMONIA) 60.0 %: below the 70.0 % needed to call PNEUMONIA"
    # rows actual, columns predicted: NORMAL 1 right 1 wrong; PNEUMONIA both called NORMAL
    assert result["confusion_matrix"] == [[1, 1], [2, 0]]
    for key in ("top_losses_png", "confusion_matrix_png"):
        with Image.open(result[key]) as img:
            assert img.format == "PNG" and img.width > 200
    with pytest.raises(PneumoError, match="k must be"):
        interpret_run(run, k=0)


def test_interpret_run_on_a_trained_run(trained_run: Path, tmp_path: Path) -> None:
    result = interpret_run(trained_run, out=tmp_path, k=4)
    losses = [t["loss"] for t in result["top_losses"]]
    assert len(losses) == 4 and losses == sorted(losses, reverse=True)
    with (trained_run / "valid_predictions.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert max(-math.log(float(r[f"prob_{r['label']}"])) for r in rows) == pytest.approx(losses[0], rel=1e-4)
    # the same decisions the trainer made at the stored threshold (valid_eval.json)
    m = json.loads((trained_run / "valid_eval.json").read_text())["metrics"]
    assert result["confusion_matrix"] == [[m["tn"], m["fp"]], [m["fn"], m["tp"]]]
    assert sum(map(sum, result["confusion_matrix"])) == len(rows)
    assert Path(result["top_losses_png"]).parent == tmp_path


def test_interpret_run_errors(tmp_path: Path) -> None:
    with pytest.raises(PneumoError, match="model.json"):
        interpret_run(tmp_path)
    _fake_run(tmp_path / "run", threshold=0.5)
    (tmp_path / "run" / "valid_predictions.csv").write_text("path,label\n")
    with pytest.raises(PneumoError, match="prob_NORMAL"):
        interpret_run(tmp_path / "run")
