"""model.json from anywhere: any JSON value in any field loads to a usable ModelMeta or raises ModelError.

Never a TypeError, a ValueError or a NaN probability: a model folder can come from anywhere, and
``read_model_meta`` is the door every command (predict, evaluate, explain, serve, adapt) passes.
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pneumo.errors import ModelError
from pneumo.model_meta import MAX_IMAGE_SIZE, MIN_IMAGE_SIZE, ModelMeta, read_model_meta

GOOD = {
    "arch": "efficientnet_lite0",
    "classes": ["NORMAL", "PNEUMONIA"],
    "image_size": 224,
    "threshold": 0.3,
    "positive_class": "PNEUMONIA",
    "temperature": 1.5,
    "threshold_method": "youden",
    "hidden": 512,
    "dropout": 0.5,
    "normalisation": {"mean": 0.5, "std": 0.5, "input": "grey, [0, 1]"},
    "pneumo_version": "0.1.0",
    "trained_with": {},
    "members": [],
    "adaptation": {},
}

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**20), max_value=10**20)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)
# values near each field's limits, which arbitrary JSON rarely hits
edges = st.sampled_from(
    [0, 1, -1, 0.0, 1.0, 0.5, 1e-9, 1e9, 15, 16, 2048, 2049, 32, "NORMAL", "PNEUMONIA", ["A"], ["A", "A"], ["A", "B"]]
)


def load(values: dict) -> ModelMeta | None:
    """read_model_meta on ``values`` written as JSON (non-finite floats as JSON's usual extension)."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.json"
        path.write_text(json.dumps(values))
        try:
            return read_model_meta(path)
        except ModelError as exc:
            assert str(path) in str(exc)  # every refusal names the file
            return None


def assert_usable(meta: ModelMeta) -> None:
    """What inference relies on, checked on the loaded object itself."""
    assert isinstance(meta.arch, str) and meta.arch
    assert len(meta.classes) >= 2 and len(set(meta.classes)) == len(meta.classes)
    assert all(isinstance(c, str) and c for c in meta.classes)
    assert MIN_IMAGE_SIZE <= meta.image_size <= MAX_IMAGE_SIZE and isinstance(meta.image_size, int)
    assert math.isfinite(meta.temperature) and meta.temperature > 0
    assert 0.0 <= meta.threshold <= 1.0
    assert meta.positive_class is None or meta.positive_class in meta.classes
    assert isinstance(meta.hidden, int) and meta.hidden >= 1 and 0 <= meta.dropout < 1
    # the decision rule runs on any probabilities and gives a class index for every row
    probs = np.random.default_rng(0).dirichlet(np.ones(len(meta.classes)), size=5)
    decided = meta.decide(probs)
    assert decided.shape == (5,) and ((0 <= decided) & (decided < len(meta.classes))).all()
    # temperature scaling of finite logits stays finite
    logits = np.array([[-30.0, 30.0] + [0.0] * (len(meta.classes) - 2)])
    z = logits / meta.temperature
    assert np.isfinite(np.exp(z - z.max(axis=1, keepdims=True))).all()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(field=st.sampled_from(sorted(GOOD)), value=json_values | edges)
def test_any_value_in_one_field_loads_usable_or_is_a_named_model_error(field, value) -> None:
    meta = load({**GOOD, field: value})
    if meta is not None:
        assert_usable(meta)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=st.dictionaries(st.sampled_from(sorted(GOOD) + ["extra"]), json_values | edges, max_size=8))
def test_any_object_loads_usable_or_is_a_named_model_error(values) -> None:
    meta = load(values)
    if meta is not None:
        assert_usable(meta)


@settings(max_examples=100, deadline=None)
@given(document=json_values)
def test_any_json_document_loads_usable_or_is_a_named_model_error(document) -> None:
    meta = load(document) if isinstance(document, dict) else load_raw(json.dumps(document))
    if meta is not None:
        assert_usable(meta)


@settings(max_examples=100, deadline=None)
@given(raw=st.binary(max_size=64))
def test_any_bytes_are_a_named_model_error(raw) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.json"
        path.write_bytes(raw)
        try:
            meta = read_model_meta(path)
        except ModelError as exc:
            assert str(path) in str(exc)
        else:
            assert_usable(meta)


def load_raw(text: str) -> ModelMeta | None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "model.json"
        path.write_text(text)
        try:
            return read_model_meta(path)
        except ModelError as exc:
            assert str(path) in str(exc)
            return None


def test_the_good_description_loads() -> None:  # (so the properties above do exercise the accepting path)
    assert_usable(load(GOOD))
