"""The one decision rule and model.json checks (pneumo.decision, pneumo.model_meta)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from pneumo.decision import decide, parse_threshold_method
from pneumo.errors import ModelError, PneumoError
from pneumo.model_meta import ModelMeta, read_model_meta, write_model_meta

CLASSES = ["NORMAL", "PNEUMONIA"]


def test_a_score_equal_to_the_threshold_is_positive() -> None:
    probs = np.array([[0.3, 0.7], [0.31, 0.69], [0.7, 0.3]])
    assert decide(probs, 1, 0.7).tolist() == [1, 0, 0]
    assert decide(probs, 0, 0.5).tolist() == [1, 1, 0]  # positive class first
    assert decide(probs, None, None).tolist() == [1, 1, 0]  # no positive class: argmax


def test_model_meta_decides_with_its_own_threshold() -> None:
    meta = ModelMeta(arch="resnet18", classes=CLASSES, image_size=224, threshold=0.8, positive_class="PNEUMONIA")
    assert meta.operating_threshold == 0.8 and meta.positive_index == 1
    assert meta.decide(np.array([[0.25, 0.75], [0.2, 0.8]])).tolist() == [0, 1]
    three = ModelMeta(arch="resnet18", classes=["A", "B", "C"], image_size=224, threshold=0.99)
    assert three.operating_threshold is None and three.decide(np.array([[0.2, 0.5, 0.3]])).tolist() == [1]


@pytest.mark.parametrize("method", ["sensitivty:0.95", "youden:1", "fixed:1.5", "sensitivity:0", "fixed:x", ""])
def test_bad_threshold_methods_are_refused(method: str) -> None:
    with pytest.raises(PneumoError, match="threshold"):
        parse_threshold_method(method)


def _write(tmp_path: Path, **changes) -> Path:
    meta = asdict(
        ModelMeta(
            arch="efficientnet_lite0",
            classes=CLASSES,
            image_size=224,
            threshold=0.4,
            positive_class="PNEUMONIA",
            temperature=1.3,
        )
    )
    meta.update(changes)
    path = tmp_path / "model.json"
    path.write_text(json.dumps(meta))
    return path


def test_a_good_model_json_round_trips(tmp_path: Path) -> None:
    meta = read_model_meta(_write(tmp_path))
    write_model_meta(tmp_path / "again" / "model.json", meta)
    assert read_model_meta(tmp_path / "again" / "model.json") == meta


@pytest.mark.parametrize(
    "field, value",
    [
        ("temperature", 0),
        ("temperature", -1.0),
        ("temperature", float("nan")),
        ("temperature", "1"),
        ("image_size", 100000),
        ("image_size", 0),
        ("image_size", 224.5),
        ("image_size", True),
        ("threshold", "x"),
        ("threshold", 1.5),
        ("threshold", None),
        ("classes", ["ONLY"]),
        ("classes", ["A", "A"]),
        ("classes", "NORMAL,PNEUMONIA"),
        ("positive_class", "CAT"),
        ("hidden", 0),
        ("dropout", 1.0),
        ("members", "a"),
        ("trained_with", []),
    ],
)
def test_every_field_is_checked_with_limits(tmp_path: Path, field: str, value) -> None:
    with pytest.raises(ModelError, match=f"model.json: field '{field}'"):
        read_model_meta(_write(tmp_path, **{field: value}))


def test_unreadable_model_json_is_named(tmp_path: Path) -> None:
    path = tmp_path / "model.json"
    path.write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(ModelError, match="model.json: not a pneumo model description"):
        read_model_meta(path)
    path.write_text("[1, 2]")
    with pytest.raises(ModelError, match="JSON object"):
        read_model_meta(path)
    with pytest.raises(ModelError, match="missing"):
        read_model_meta(tmp_path / "absent" / "model.json")
    with pytest.raises(ModelError, match="unknown field"):
        read_model_meta(_write(tmp_path, colour="blue"))
