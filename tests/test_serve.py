"""The web API: good images read, every bad upload refused with a clear 4xx, never a 500."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import numpy as np
import pytest
from fastapi import HTTPException
from fastapi.testclient import TestClient
from PIL import Image

from conftest import one_torch_thread  # noqa: E402
from pneumo.data.imaging import prepare
from pneumo.infer.model_folder import load_model
from pneumo.serve.app import create_app
from pneumo.serve.limits import InferencePool

SAMPLE = Path(__file__).resolve().parents[1] / "src" / "pneumo" / "sample_data" / "chest_xray"
STATIC = Path(__file__).resolve().parents[1] / "src" / "pneumo" / "serve" / "static"


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def client(trained_run: Path) -> TestClient:
    app = create_app(trained_run / "model", max_upload_mb=1.0, inference_workers=2, queue_limit=4)
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c


def xray_bytes(fmt: str, size: tuple[int, int] = (300, 240)) -> bytes:
    """A real sample X-ray, resized to a non-square shape, encoded as ``fmt``."""
    path = sorted(SAMPLE.glob("test/PNEUMONIA/*.jpeg"))[0]
    buf = io.BytesIO()
    Image.open(path).convert("L").resize(size).save(buf, format=fmt)
    return buf.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` grey pixels: a decompression bomb."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (width + 1) * 4, 9)  # a few rows of zeros; the rest never decoded
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def post(client: TestClient, data: bytes, name: str = "x.jpeg", ctype: str = "image/jpeg", **params: str):
    return client.post("/api/predict", files={"file": (name, data, ctype)}, params=params)


@pytest.mark.parametrize("fmt,ctype", [("JPEG", "image/jpeg"), ("PNG", "image/png")])
def test_good_image_gives_label_p_positive_threshold_heatmap(
    client: TestClient, trained_run: Path, fmt: str, ctype: str
) -> None:
    data = xray_bytes(fmt)
    r = post(client, data, f"xray.{fmt.lower()}", ctype)
    assert r.status_code == 200, r.text
    body = r.json()
    model = load_model(trained_run / "model")
    probs = model.probabilities(np.array(prepare(data, 64))[None])
    assert body["label"] == model.classes[int(model.decide(probs)[0])]  # the stored threshold decides
    assert body["p_positive"] == pytest.approx(float(probs[0, model.classes.index("PNEUMONIA")]), abs=1e-5)
    assert body["p_positive"] == body["probabilities"]["PNEUMONIA"] and body["reading"].startswith("p(PNEUMONIA) ")
    assert body["threshold"] == pytest.approx(model.meta.threshold)
    assert set(body["probabilities"]) == {"NORMAL", "PNEUMONIA"}
    assert body["image"] == {"width": 300, "height": 240, "mode": "L"}
    with Image.open(io.BytesIO(base64.b64decode(body["heatmap_png_base64"]))) as heat:
        assert heat.format == "PNG" and heat.size == (300, 240) and heat.mode == "RGB"
    assert body["heatmap_class"] == body["label"]


def test_heatmap_can_be_left_out(client: TestClient) -> None:
    r = post(client, xray_bytes("JPEG"), heatmap="false")
    assert r.status_code == 200 and r.json()["heatmap_png_base64"] is None and r.json()["label"]


@pytest.mark.parametrize(
    "data,name,ctype,status,words",
    [
        (b"just some notes, not an x-ray\n", "notes.jpeg", "image/jpeg", 415, "not a JPEG or PNG"),
        (b"GIF89a" + bytes(40), "anim.gif", "image/gif", 415, "not a JPEG or PNG"),
        (b"\x89PNG\r\n\x1a\n", "x.png", "text/plain", 415, "content type"),
        (b"", "empty.png", "image/png", 422, "empty"),
        (b"\xff\xd8\xff" + bytes(500), "zeros.jpeg", "image/jpeg", 422, "zeros.jpeg"),
        (b"\x89PNG\r\n\x1a\n" + b"\xde\xad" * 100, "garbage.png", "image/png", 422, "garbage.png"),
    ],
)
def test_bad_uploads_are_refused_clearly(
    client: TestClient, data: bytes, name: str, ctype: str, status: int, words: str
) -> None:
    r = post(client, data, name, ctype)
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]


def test_truncated_jpeg_is_422_naming_the_problem(client: TestClient) -> None:
    data = xray_bytes("JPEG")
    for cut in (len(data) // 2, 300):
        r = post(client, data[:cut], "cut.jpeg")
        assert r.status_code == 422 and "cut.jpeg" in r.json()["detail"]
        assert "truncat" in r.json()["detail"].lower()


def test_too_large_upload_is_413(client: TestClient) -> None:
    big = b"\xff\xd8\xff" + bytes(int(1.2 * 2**20))
    r = post(client, big, "big.jpeg")
    assert r.status_code == 413 and "1.0 MB" in r.json()["detail"]

    def chunks():  # no Content-Length: the body is cut off while it streams in
        for _ in range(20):
            yield bytes(128 * 1024)

    r = client.post("/api/predict", content=chunks(), headers={"content-type": "multipart/form-data; boundary=xyz"})
    assert r.status_code == 413


def test_decompression_bomb_is_refused(client: TestClient, trained_run: Path) -> None:
    bomb = png_claiming(20000, 20000)
    assert len(bomb) < 2000
    r = post(client, bomb, "bomb.png", "image/png")
    assert r.status_code == 413 and "decompression bomb" in r.json()["detail"]
    strict = create_app(trained_run / "model", max_pixels=100 * 100)
    with TestClient(strict, raise_server_exceptions=False) as c:
        r = post(c, xray_bytes("PNG"), "big.png", "image/png")
        assert r.status_code == 413 and "300x240" in r.json()["detail"]


def test_fuzzed_bytes_never_give_a_500(client: TestClient) -> None:
    rng = np.random.default_rng(0)
    good = xray_bytes("JPEG")
    for i in range(12):
        data = bytearray(good)
        spots = rng.integers(3, len(data), 40)
        data[spots[0] : spots[0] + 1] = b""  # shift once, then scribble
        for s in spots[1:]:
            if s < len(data):
                data[s] = int(rng.integers(0, 256))
        r = post(client, bytes(data), f"fuzz{i}.jpeg")
        assert r.status_code in (200, 413, 415, 422), (i, r.status_code, r.text)


def test_missing_file_field_is_422(client: TestClient) -> None:
    assert client.post("/api/predict").status_code == 422


def test_model_health_openapi_and_offline_pages(client: TestClient) -> None:
    info = client.get("/api/model").json()
    assert info["classes"] == ["NORMAL", "PNEUMONIA"] and info["image_size"] == 64
    assert info["arch"] == "efficientnet_lite0" and 0 < info["threshold"] < 1
    trained = info["trained_on"]  # what the page says beside every answer
    assert trained["data"] == "chest_xray" and trained["n_train"] + trained["n_valid"] == 200
    assert trained["sentence"].startswith(f"Trained on {trained['n_train']} training images of chest_xray")
    assert "demonstration model" in trained["sentence"] and "/" not in trained["sentence"]  # no paths
    assert client.get("/health").json()["status"] == "ok"
    schema = client.get("/openapi.json").json()
    assert "post" in schema["paths"]["/api/predict"] and "/api/model" in schema["paths"]
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/api/predict" in docs.text and "cdn" not in docs.text.lower()
    page = client.get("/")
    assert page.status_code == 200 and 'id="file"' in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for name in ("index.html", "app.js", "style.css"):  # nothing fetched from anywhere else
        text = (STATIC / name).read_text()
        assert "http://" not in text and "https://" not in text and "//cdn" not in text
        assert client.get(f"/static/{name}").status_code == 200


def test_pool_answers_503_when_the_queue_is_full() -> None:
    release = threading.Event()

    async def scenario() -> list:
        pool = InferencePool(workers=1, queue_limit=1)
        running = [asyncio.create_task(pool.run(release.wait, 10)) for _ in range(2)]  # 1 runs, 1 waits
        await asyncio.sleep(0.05)
        assert pool.active == 2 and pool.waiting == 1
        with pytest.raises(HTTPException) as refused:
            await pool.run(release.wait, 10)
        release.set()
        done = await asyncio.gather(*running)
        pool.executor.shutdown()
        return [refused.value.status_code, pool.active, *done]

    assert asyncio.run(scenario()) == [503, 0, True, True]


def declared_schema(openapi: dict, path: str, method: str, status: int) -> dict:
    """The JSON schema the OpenAPI document declares for one answer, with its components to resolve refs."""
    responses = openapi["paths"][path][method]["responses"]
    assert str(status) in responses, f"{method.upper()} {path} does not declare {status}: {sorted(responses)}"
    return {**responses[str(status)]["content"]["application/json"]["schema"], "components": openapi["components"]}


def test_every_answer_is_one_the_schema_declares(client: TestClient) -> None:
    """Real answers (a reading, each refusal) against the schema: what schemathesis cannot generate."""
    openapi = client.get("/openapi.json").json()
    answers = [
        ("/api/predict", post(client, xray_bytes("JPEG"))),
        ("/api/predict", post(client, xray_bytes("PNG"), "x.png", "image/png", heatmap="false")),
        ("/api/predict", post(client, b"\xff\xd8\xff" + bytes(int(1.2 * 2**20)), "big.jpeg")),  # 413
        ("/api/predict", post(client, png_claiming(20000, 20000), "bomb.png", "image/png")),  # 413
        ("/api/predict", post(client, b"notes", "n.jpeg")),  # 415
        ("/api/predict", post(client, b"", "empty.png", "image/png")),  # 422
        ("/api/predict", client.post("/api/predict")),  # 422: no file field
        ("/api/predict", post(client, xray_bytes("JPEG"), heatmap="perhaps")),  # 422: bad query
        (
            "/api/predict",
            client.post(
                "/api/predict", content=b"--x\r\nbroken", headers={"content-type": "multipart/form-data; boundary=x"}
            ),
        ),
        ("/api/model", client.get("/api/model")),
        ("/health", client.get("/health")),
    ]
    method = {"/api/predict": "post", "/api/model": "get", "/health": "get"}
    seen = set()
    for path, r in answers:
        jsonschema.validate(r.json(), declared_schema(openapi, path, method[path], r.status_code))
        if r.status_code >= 400:
            assert isinstance(r.json()["detail"], str) and r.json()["detail"], r.text
        seen.add(r.status_code)
    assert seen >= {200, 413, 415, 422}, seen
    assert "file: Field required" in client.post("/api/predict").json()["detail"]
    body = openapi["components"]["schemas"]["Body_predict_api_predict_post"]["properties"]["file"]
    assert body["minLength"] == 1  # an empty upload is outside the contract, as the server says
    encoding = openapi["paths"]["/api/predict"]["post"]["requestBody"]["content"]["multipart/form-data"]["encoding"]
    assert encoding["file"]["contentType"] == "image/jpeg, image/png, application/dicom"


def test_no_field_of_the_schema_or_an_answer_means_p_label(client: TestClient) -> None:
    """One meaning of probability: p(positive class). The old "probability" field gave p(label), so
    beside "label": "NORMAL" a 0.70 read as 70 % pneumonia. Neither the schema nor a real answer for
    a film labelled NORMAL may carry p(NORMAL) anywhere but under its class's name in probabilities."""
    openapi = client.get("/openapi.json").json()
    declared = openapi["components"]["schemas"]["Reading"]["properties"]
    probability_fields = {name for name in declared if "prob" in name or name.startswith("p_")}
    assert probability_fields == {"probabilities", "p_positive"}, probability_fields
    assert "p(positive_class)" in declared["p_positive"]["description"]
    assert "every class" in declared["probabilities"]["description"]
    films = sorted(SAMPLE.glob("test/*/*.jpeg"))
    normal = None
    for film in films:  # the first film the model labels NORMAL: there p(label) differs from p_positive
        body = post(client, film.read_bytes(), film.name, heatmap="false").json()
        if body["label"] == "NORMAL":
            normal = body
            break
    assert normal is not None, "the test model labels no sample film NORMAL"
    assert "probability" not in normal and normal["p_positive"] == normal["probabilities"]["PNEUMONIA"]
    p_label = normal["probabilities"]["NORMAL"]
    assert abs(p_label - normal["p_positive"]) > 1e-6  # else this test could not tell the two apart
    top_level_numbers = {k: v for k, v in normal.items() if isinstance(v, float)}
    assert not [k for k, v in top_level_numbers.items() if abs(v - p_label) < 1e-9], top_level_numbers


def test_the_page_asks_for_dicom_too(client: TestClient) -> None:
    """The server reads DICOM: the page says so, and its file chooser offers DICOM files."""
    page = client.get("/").text
    assert "Drop a JPEG, PNG or DICOM chest X-ray here" in page and "JPEG or PNG here" not in page
    accept = page.split('accept="', 1)[1].split('"', 1)[0].split(",")
    assert {".dcm", "application/dicom", ".jpeg", ".png"} <= set(accept)


def test_page_says_it_needs_javascript_instead_of_loading_forever(client: TestClient) -> None:
    page = client.get("/").text
    assert "<noscript>" in page and "needs JavaScript" in page
    assert "Loading" not in page  # the script says it is loading, once it runs
