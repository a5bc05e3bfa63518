"""ONNX export and the onnxruntime route: parity with PyTorch, the sidecar, torch never imported.

Slow for a test file (about a minute on the 2-core box): PyTorch's dynamo exporter traces the network
once per graph (~20 s for the 64 px model, twice that for the two-member ensemble); both are exported
once per module and shared.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, SAMPLE_ROOT, one_torch_thread
from pneumo.cli import main
from pneumo.errors import ModelError, PneumoError
from pneumo.extras import available

pytestmark = pytest.mark.skipif(not available("onnx", "onnxruntime", "onnxscript"), reason="needs pneumo[onnx]")

TEST_FILMS = SAMPLE_ROOT / "test"


def run_without_torch(code: str) -> dict:
    """Run ``code`` in a fresh interpreter; it prints JSON and we add whether torch got imported."""
    wrapper = f"import json, sys\n{code}\nprint('@@' + json.dumps({{'torch': 'torch' in sys.modules}}))"
    done = subprocess.run(
        [sys.executable, "-c", wrapper], capture_output=True, text=True, timeout=120, cwd=REPO, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    body, _, tail = done.stdout.rpartition("@@")
    return {"stdout": body, **json.loads(tail)}


def test_export_writes_a_graph_that_agrees_with_pytorch(exported):
    folder, report = exported
    onnx_file = folder / "model.onnx"
    assert report["onnx"] == str(onnx_file) and onnx_file.stat().st_size == report["bytes"] > 1_000_000
    parity = report["parity"]
    assert parity["images"] == 260 and parity["unreadable"] == 0  # the whole bundled sample
    assert parity["passed"] and parity["decisions_identical"] and parity["decisions_differing"] == 0
    assert 0 <= parity["max_abs_diff"] <= 1e-4
    stored = json.loads((folder / "model.parity.json").read_text())
    assert stored["max_abs_diff"] == parity["max_abs_diff"] and stored["opset"] == 18

    model_json = json.loads((folder / "model.json").read_text())
    sidecar = json.loads((folder / "model.meta.json").read_text())
    for key in ("classes", "threshold", "positive_class", "image_size", "temperature", "threshold_method", "arch"):
        assert sidecar[key] == model_json[key], key
    assert sidecar["opset"] == 18 and sidecar["input"]["dtype"] == "uint8"
    from pneumo.infer.model_card import model_fingerprint
    from pneumo.infer.onnx import file_sha256

    assert sidecar["sha256"] == file_sha256(onnx_file)
    assert sidecar["source_model_sha256"] == model_fingerprint(folder)
    card = (folder / "MODEL_CARD.md").read_text()
    assert "## ONNX export" in card and sidecar["sha256"] in card
    assert main(["card", str(folder)]) == 0  # a rewritten card still describes the export beside it
    assert f"max |diff| of probabilities {parity['max_abs_diff']:.2e}" in (folder / "MODEL_CARD.md").read_text()


def test_the_graph_takes_any_batch_of_uint8_films_and_returns_calibrated_probabilities(exported):
    import onnx
    import onnxruntime as ort

    from pneumo.infer.model_folder import load_model

    folder, _ = exported
    proto = onnx.load(str(folder / "model.onnx"))
    assert {p.key: p.value for p in proto.metadata_props}["pneumo_format"] == "pneumo-onnx/1"
    assert max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")) == 18
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert inp.type == "tensor(uint8)" and inp.shape[1:] == [64, 64] and isinstance(inp.shape[0], str)
    torch_model = load_model(folder)
    rng = np.random.default_rng(0)
    for n in (1, 5):
        pixels = rng.integers(0, 256, (n, 64, 64), dtype=np.uint8)
        probs, features = session.run(None, {"pixels": pixels})  # and the body's features, for infer.scope
        assert probs.shape == (n, 2) and np.allclose(probs.sum(axis=1), 1, atol=1e-5)
        torch_probs, (torch_features,) = torch_model.probabilities_and_features(pixels)
        np.testing.assert_allclose(probs, torch_probs, atol=1e-4)
        np.testing.assert_allclose(features, torch_features, rtol=1e-3, atol=1e-4)
    # the temperature is inside: without it the probabilities would be sharper
    assert torch_model.meta.temperature != 1.0


def test_predict_with_the_onnx_runtime_never_imports_torch_and_matches_pytorch(exported):
    from pneumo.infer.predict import predict_files

    folder, _ = exported
    out = run_without_torch(
        "from pneumo.cli import main\n"
        f"rc = main(['predict', {str(folder)!r}, {str(TEST_FILMS)!r}, '--runtime', 'onnx', '--json'])\n"
        "assert rc == 0"
    )
    assert out["torch"] is False
    onnx_rows = json.loads(out["stdout"])
    torch_rows = predict_files(folder, [TEST_FILMS], progress=False, runtime="torch")
    assert len(onnx_rows) == len(torch_rows) == 60
    for a, b in zip(onnx_rows, torch_rows):
        assert a["path"] == b["path"] and a["threshold"] == b["threshold"]
        assert abs(a["p_PNEUMONIA"] - b["p_PNEUMONIA"]) <= 1e-4
        # the graph gives the body features too: scope is measured as PyTorch measures it
        assert a["in_scope"] == b["in_scope"] and a["label"] == b["label"]
        assert (a["scope_distance"] is None) == (b["scope_distance"] is None)
        if a["scope_distance"] is not None:
            assert abs(a["scope_distance"] - b["scope_distance"]) <= 1e-3 * max(1.0, b["scope_distance"])


def test_serve_with_the_onnx_runtime_never_imports_torch(exported):
    folder, _ = exported
    film = TEST_FILMS / "PNEUMONIA" / sorted(p.name for p in (TEST_FILMS / "PNEUMONIA").iterdir())[0]
    out = run_without_torch(
        "from fastapi.testclient import TestClient\n"
        "from pneumo.serve.app import create_app\n"
        f"client = TestClient(create_app({str(folder)!r}, runtime='onnx'))\n"
        f"data = open({str(film)!r}, 'rb').read()\n"
        "r = client.post('/api/predict', files={'file': ('x.jpeg', data, 'image/jpeg')})\n"
        "assert r.status_code == 200, r.text\n"
        "print(json.dumps({'predict': r.json(), 'model': client.get('/api/model').json()}))"
    )
    assert out["torch"] is False
    served = json.loads(out["stdout"])
    assert served["model"]["runtime"] == "onnx"
    result = served["predict"]
    assert result["heatmap_png_base64"] is None and "torch" in result["heatmap_unavailable"]
    from pneumo.infer.predict import predict_files

    (row,) = predict_files(folder, [film], progress=False, runtime="torch")
    assert abs(result["p_positive"] - row["p_positive"]) <= 1e-4
    assert result["label"] == row["label"] or row["in_scope"] is False


def test_the_onnx_runtime_refuses_what_it_cannot_trust(exported, tmp_path, capsys):
    from pneumo.infer.onnx import load_onnx_model

    folder, _ = exported
    bare = tmp_path / "bare"
    shutil.copytree(folder, bare, ignore=shutil.ignore_patterns("model.onnx"))
    assert main(["predict", str(bare), str(TEST_FILMS), "--runtime", "onnx"]) == 2
    assert f"pneumo export {bare}" in capsys.readouterr().err

    changed = tmp_path / "changed"
    shutil.copytree(folder, changed)
    with (changed / "model.onnx").open("ab") as f:
        f.write(b"\0")
    with pytest.raises(ModelError, match="changed since it was exported"):
        load_onnx_model(changed)

    (changed / "model.meta.json").unlink()
    with pytest.raises(ModelError, match=r"model\.meta\.json: missing"):
        load_onnx_model(changed / "model.onnx")

    with pytest.raises(PneumoError, match="--tta needs the network"):
        load_onnx_model(folder).probabilities(np.zeros((1, 64, 64), np.uint8), tta=True)


def test_pneumo_ensemble_exports_it_as_one_graph(trained_run, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    from pneumo.infer.model_folder import load_model
    from pneumo.infer.onnx import load_onnx_model
    from pneumo.infer.runtime import resolve_runtime

    runs = [tmp_path / f"run{i}" for i in range(2)]
    for run in runs:
        shutil.copytree(trained_run, run, ignore=shutil.ignore_patterns("checkpoints"))
    weights = runs[1] / "model" / "model.safetensors"  # a second, different member: its head halved
    state = load_file(str(weights))
    save_file({k: v * 0.5 if k.startswith("head.") else v for k, v in state.items()}, str(weights))
    for run in runs:  # as `pneumo train` leaves them: the members' own exports are not copied
        (run / "model" / "model.onnx").write_bytes(b"a member's own export")
    with one_torch_thread():
        assert main(["ensemble", *map(str, runs), "--out", str(tmp_path / "ens"), "--json"]) == 0
    said = json.loads(capsys.readouterr().out)["onnx_export"]
    out = tmp_path / "ens" / "model" / "model.onnx"
    assert said.startswith(f"ONNX export written to {out}")
    assert json.loads((tmp_path / "ens" / "model" / "model.parity.json").read_text())["passed"]
    assert not list((tmp_path / "ens" / "model" / "members").rglob("*.onnx"))
    assert resolve_runtime(tmp_path / "ens")[0] == "onnx"

    import onnx

    graph = onnx.load(str(out)).graph
    assert [i.name for i in graph.input] == ["pixels"]
    assert [o.name for o in graph.output] == ["probabilities", "features_0", "features_1"]  # each member's
    pixels = np.random.default_rng(1).integers(0, 256, (4, 64, 64), dtype=np.uint8)
    ensemble = load_model(tmp_path / "ens")
    via_onnx = load_onnx_model(out).probabilities(pixels)
    np.testing.assert_allclose(via_onnx, ensemble.probabilities(pixels), atol=1e-4)
    for member in ensemble.members:  # both members are inside the graph
        assert np.abs(via_onnx - member.probabilities(pixels)).max() > 1e-3


def test_export_refuses_an_output_that_is_not_onnx(exported, tmp_path, capsys):
    folder, _ = exported
    assert main(["export", str(folder), "--onnx", str(tmp_path / "model.bin")]) == 2
    assert "must end in .onnx" in capsys.readouterr().err
