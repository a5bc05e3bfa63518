"""pneumo.data.shifts (deterministic, grey, each doing what its name says) and bench/shift.py end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import load_bench, one_torch_thread
from pneumo.data.imaging import prepare
from pneumo.data.shifts import (
    ACQUISITION,
    FAMILIES,
    PHOTOMETRIC,
    SHIFTS,
    blur,
    brightness,
    contrast,
    gamma,
    jpeg,
    kaggle_copy,
    make_shifts,
    noise,
    png,
    resample,
    select_shifts,
)
from pneumo.errors import PneumoError
from pneumo.run_folder import RunFolder

REPO = Path(__file__).resolve().parents[1]


def film(w: int = 48, h: int = 40, seed: int = 0, mode: str = "L") -> Image.Image:
    """A small film-like image: a smooth gradient with a bright blob, some texture, never clipped."""
    yy, xx = np.mgrid[0:h, 0:w] / np.array([h, w])[:, None, None]
    x = 0.25 + 0.35 * xx + 0.25 * np.exp(-((xx - 0.5) ** 2 + (yy - 0.5) ** 2) / 0.05)
    x += 0.04 * np.random.default_rng(seed).standard_normal((h, w))
    return Image.fromarray(np.clip(x * 255, 0, 255).astype(np.uint8), mode="L").convert(mode)


def hf_energy(img: Image.Image) -> float:
    """Mean squared difference of neighbouring pixels: what blur removes and noise adds."""
    x = np.asarray(img, dtype=np.float64)
    return float((np.diff(x, axis=0) ** 2).mean() + (np.diff(x, axis=1) ** 2).mean())


def px(img: Image.Image) -> np.ndarray:
    return np.asarray(img, dtype=np.int16)


# ---------------------------------------------------------------- the registry


def test_registry_names_families_and_descriptions():
    assert set(FAMILIES) == {PHOTOMETRIC, ACQUISITION}
    assert [n for f in FAMILIES.values() for n in f] == list(SHIFTS)
    expected = {
        "gamma_0.6",
        "gamma_0.8",
        "gamma_1.25",
        "gamma_1.6",
        "contrast_0.7",
        "contrast_1.3",
        "brightness_-0.1",
        "brightness_+0.1",
        "blur_1",
        "blur_2",
        "sharpen",
        "noise_0.02",
        "noise_0.05",
        "jpeg_50",
        "jpeg_75",
        "jpeg_90",
        "jpeg_95",
        "jpeg_100",
        "png",
        "resample_nearest",
        "resample_bilinear",
        "resample_bicubic",
        "resample_lanczos",
    }
    assert set(SHIFTS) == expected
    for name, shift in SHIFTS.items():
        assert shift.name == name and shift.description and "\n" not in shift.description


def test_select_shifts_by_name_and_family_refuses_typos():
    assert list(select_shifts("gamma_1.6,png")) == ["gamma_1.6", "png"]
    assert list(select_shifts("acquisition")) == list(FAMILIES[ACQUISITION])
    assert list(select_shifts(None)) == list(SHIFTS) == list(select_shifts("all"))
    with pytest.raises(PneumoError, match="gama_1.6"):
        select_shifts("gama_1.6")


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_every_shift_is_deterministic_grey_and_sane(mode):
    img, other = film(mode=mode), film(seed=1, mode=mode)
    for name, shift in make_shifts(32).items():
        a, b = shift(img), shift(img.copy())
        assert a.mode == "L", name
        assert px(a).tobytes() == px(b).tobytes(), f"{name} is not deterministic"
        assert a.size == ((32, 32) if name.startswith("resample") else img.size), name
        x = np.asarray(a, dtype=np.float64)
        assert 20 < x.mean() < 235 and x.std() > 5, f"{name}: mean {x.mean():.1f}, std {x.std():.1f}"
        assert prepare(a, 32).shape == (32, 32)
        assert shift(other).tobytes() != a.tobytes(), f"{name} ignores its input"


def test_identity_parameters_change_nothing():
    img = film()
    for transform in (gamma(1.0), contrast(1.0), brightness(0.0), noise(0.0), png()):
        assert np.array_equal(px(transform(img)), px(img))
    square = film(40, 40)
    assert np.array_equal(px(resample("nearest", 40)(square)), px(square))


def test_png_is_lossless_and_jpeg_100_is_close():
    img = film()
    assert np.array_equal(px(SHIFTS["png"](img)), px(img))
    diff = np.abs(px(SHIFTS["jpeg_100"](img)) - px(img))
    assert diff.max() <= 3 and diff.mean() < 0.6
    worse = np.abs(px(SHIFTS["jpeg_50"](img)) - px(img)).mean()
    assert worse > diff.mean()  # quality 50 loses more than quality 100


def test_gamma_above_one_darkens_mid_greys():
    mid = Image.new("L", (16, 16), 128)
    assert np.asarray(SHIFTS["gamma_1.25"](mid)).max() < 128 < np.asarray(SHIFTS["gamma_0.8"](mid)).min()
    assert np.asarray(SHIFTS["gamma_1.6"](mid)).mean() < np.asarray(SHIFTS["gamma_1.25"](mid)).mean()
    black, white = Image.new("L", (8, 8), 0), Image.new("L", (8, 8), 255)
    assert np.asarray(gamma(1.6)(black)).max() == 0 and np.asarray(gamma(1.6)(white)).min() == 255


def test_contrast_and_brightness_move_the_greys_the_right_way():
    img = film()
    x = np.asarray(img, dtype=float)
    assert (
        np.asarray(SHIFTS["contrast_1.3"](img), float).std()
        > x.std()
        > np.asarray(SHIFTS["contrast_0.7"](img), float).std()
    )
    assert np.asarray(SHIFTS["brightness_+0.1"](img), float).mean() == pytest.approx(x.mean() + 25.5, abs=1)
    assert np.asarray(SHIFTS["brightness_-0.1"](img), float).mean() == pytest.approx(x.mean() - 25.5, abs=1)


def test_blur_lowers_and_noise_and_sharpening_raise_high_frequency_energy():
    img = film()
    base = hf_energy(img)
    assert hf_energy(SHIFTS["blur_2"](img)) < hf_energy(SHIFTS["blur_1"](img)) < base
    assert base < hf_energy(SHIFTS["noise_0.02"](img)) < hf_energy(SHIFTS["noise_0.05"](img))
    assert hf_energy(SHIFTS["sharpen"](img)) > base


def test_blur_is_stated_at_224_px_scale():
    """sigma 2 at 224 scale is 4 px on a 448 px film: blurring then resizing ~ resizing then blurring."""
    big = film(448, 448).resize((448, 448))
    small = big.resize((224, 224), Image.Resampling.BILINEAR)
    a = px(blur(2)(big).resize((224, 224), Image.Resampling.BILINEAR))
    b = px(blur(2)(small))
    assert np.abs(a - b).mean() < 1.0


def test_noise_is_seeded_per_film_and_by_its_seed():
    a, b = film(seed=0), film(seed=0).transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    na = px(noise(0.05)(a)) - px(a)
    nb = px(noise(0.05)(b)) - px(b)
    assert not np.array_equal(na, nb)  # two films, two noise fields
    assert not np.array_equal(px(noise(0.05, seed=1)(a)), px(noise(0.05, seed=2)(a)))
    assert 8 < na.std() < 18  # sigma 0.05 of 255 = 12.75 grey levels, less what clipping and rounding take


def test_sixteen_bit_films_and_the_kaggle_copy():
    x = (np.asarray(film(), dtype=np.float64) / 255 * 4095).astype(np.uint16)
    sixteen = Image.fromarray(x)
    out = SHIFTS["gamma_1.6"](sixteen)
    assert out.mode == "L" and out.size == sixteen.size
    copy = kaggle_copy(film(96, 80), size=32)
    assert copy.mode == "L" and copy.size == (32, 32)
    assert np.abs(px(copy) - px(film(96, 80).resize((32, 32), Image.Resampling.BILINEAR))).mean() < 3


def test_resampling_filters_differ_on_a_larger_film():
    big = film(97, 89)
    outs = {m: px(resample(m, 32)(big)) for m in ("nearest", "bilinear", "bicubic", "lanczos")}
    assert all(o.shape == (32, 32) for o in outs.values())
    assert not np.array_equal(outs["nearest"], outs["bilinear"])
    assert not np.array_equal(outs["bicubic"], outs["lanczos"])
    with pytest.raises(PneumoError):
        resample("box", 32)
    with pytest.raises(PneumoError):
        jpeg(0)


# ---------------------------------------------------------------- bench/shift.py


def in_unit(report_section: dict) -> None:
    for key, value in report_section.items():
        if isinstance(value, dict):
            in_unit(value)
        elif isinstance(value, float) and key not in ("mean_dp",):
            assert 0.0 <= value <= 1.0, (key, value)


def test_bench_runs_end_to_end_on_a_small_model(trained_run, tmp_path, capsys, make_tree):
    bench = load_bench("shift")
    # two larger "originals" of validation films: their copies are found by file name
    valid = RunFolder(trained_run).read_split().valid
    originals = tmp_path / "fullres"
    for p in valid[:1] + valid[-1:]:
        dest = originals / Path(p).parent.name / Path(p).name
        dest.parent.mkdir(parents=True, exist_ok=True)
        Image.open(p).convert("L").resize((160, 144), Image.Resampling.BICUBIC).save(dest)
    out = tmp_path / "out"
    with one_torch_thread():
        rc = bench.main(
            [
                str(trained_run / "model"),
                "--out",
                str(out),
                "--limit",
                "12",
                "--shifts",
                "gamma_1.6,blur_2,png",
                "--fullres",
                str(originals),
                "--fullres-copies",
                str(Path(valid[0]).parents[1]),
                "--no-progress",
            ]
        )
    assert rc == 0
    printed = json.loads(capsys.readouterr().out)
    report = json.loads((out / "shift.json").read_text())
    assert printed == report
    assert {
        "model",
        "threshold",
        "prevalence",
        "films",
        "clean",
        "shifts",
        "worst",
        "fullres",
        "notes",
        "timing",
    } <= set(report)
    assert report["films"]["n"] == 12 and report["films"]["split_method"] == "patient"
    assert report["prevalence"] == pytest.approx(0.625)
    assert list(report["shifts"]) == ["gamma_1.6", "blur_2", "png"]
    assert report["clean"]["max_abs_diff_vs_run_predictions"] < 1e-4  # the benchmark's clean path is pneumo's
    for name, row in [("clean", report["clean"])] + list(report["shifts"].items()):
        m = row["metrics"]
        for key in ("sensitivity", "specificity", "accuracy", "balanced_accuracy", "auc"):
            assert m[key] is not None and 0.0 <= m[key] <= 1.0, (name, key)
        assert 0.0 <= m["reweighted"]["accuracy"] <= 1.0
        in_unit(row)
    for row in report["shifts"].values():
        c = row["consistency"]
        assert 0 <= c["median_abs_dp"] <= c["p95_abs_dp"] <= c["max_abs_dp"] <= 1 and 0 <= c["flip_rate"] <= 1
    png_row = report["shifts"]["png"]["consistency"]
    assert png_row["identical_films"] == 12 and png_row["max_abs_dp"] == 0 and png_row["flip_rate"] == 0
    assert set(report["worst"]) == {"photometric", "acquisition"}
    assert report["worst"]["acquisition"]["largest_p95_abs_dp"]["shift"] == "png"
    full = report["fullres"]
    assert full["n"] == 2 and all(f["has_copy"] and f["in_films"] is not None for f in full["films"])
    assert full["summary"]["original"]["vs_original"]["max_abs_dp"] == 0
    assert full["summary"]["pneumo_resize+png"]["vs_original"]["max_abs_dp"] == 0
    md = (out / "shift.md").read_text()
    assert "| clean |" in md and "| blur_2 | photometric |" in md and "Full-resolution" in md
    rows = (out / "shift_films.csv").read_text().splitlines()
    assert rows[0] == "path,label,p_clean,p_gamma_1.6,p_blur_2,p_png" and len(rows) == 13


def test_bench_reads_films_from_a_folder_or_an_ensemble_folder(trained_run, tmp_path, capsys, make_tree):
    bench = load_bench("shift")
    films = make_tree(
        tmp_path / "films",
        {
            "NORMAL": ["IM-0900-0001.jpeg", "IM-0901-0001.jpeg"],
            "PNEUMONIA": ["person900_virus_1.jpeg", "person901_virus_2.jpeg"],
            "OTHER": ["x.jpeg"],
        },
        size=(48, 40),
    )
    with one_torch_thread():
        assert (
            bench.main(
                [
                    str(trained_run / "model"),
                    "--out",
                    str(tmp_path / "a"),
                    "--films",
                    str(films),
                    "--shifts",
                    "noise_0.05",
                    "--fullres",
                    "none",
                    "--no-progress",
                ]
            )
            == 0
        )
    report = json.loads(capsys.readouterr().out)
    assert report["films"]["n"] == 4 and report["films"]["split_method"] == "given folder (--films)"
    assert any("OTHER" in n for n in report["notes"])

    ens = tmp_path / "ens"  # an ensemble folder: a model and valid_predictions.csv, no split.json
    shutil.copytree(trained_run / "model", ens / "model")
    shutil.copy(RunFolder(trained_run).predictions_file, ens / "valid_predictions.csv")
    with one_torch_thread():
        assert (
            bench.main(
                [
                    str(ens / "model"),
                    "--out",
                    str(tmp_path / "b"),
                    "--limit",
                    "6",
                    "--shifts",
                    "jpeg_50",
                    "--fullres",
                    "none",
                    "--no-progress",
                ]
            )
            == 0
        )
    report = json.loads(capsys.readouterr().out)
    assert report["films"]["n"] == 6 and report["films"]["source"].endswith("valid_predictions.csv")
    assert report["fullres"] is None
    assert report["clean"]["max_abs_diff_vs_run_predictions"] < 1e-4

    assert bench.main([str(trained_run / "model"), "--out", str(tmp_path / "c"), "--shifts", "gama"]) == 2
    assert "unknown shift" in capsys.readouterr().err
